"""vehicle_id: VehicleID (no cameras; train 13,164 ids; test lists of 800/1600/2400 ids).

    python -m musp_jax.build_dataset vehicle_id --manual_dir DIR --config small

The `test` split is the whole test list of the config's size, in list order (the
evaluation protocol forms query and gallery from it).
"""

from __future__ import annotations

import dataclasses
import os

import tensorflow_datasets as tfds

from tfds_builders import reid_base


@dataclasses.dataclass(eq=False)
class VehicleIdConfig(tfds.core.BuilderConfig):
  test_list: str = "test_list_800.txt"


class Builder(reid_base.ReIdBuilder):
  """VehicleID with one config per test size."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [
      VehicleIdConfig(name="small", description="Test list of 800 ids.",
                      test_list="test_list_800.txt"),
      VehicleIdConfig(name="medium", description="Test list of 1,600 ids.",
                      test_list="test_list_1600.txt"),
      VehicleIdConfig(name="large", description="Test list of 2,400 ids.",
                      test_list="test_list_2400.txt"),
  ]
  DEFAULT_CONFIG_NAME = "small"
  DESCRIPTION = "VehicleID vehicle re-identification; camera_id is -1 (not recorded)."
  HOMEPAGE = "https://www.pkuml.org/resources/pku-vehicleid.html"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Request PKU VehicleID from its authors (https://www.pkuml.org/resources/pku-vehicleid.html),
extract it, and pass the extracted folder as --manual_dir. It must hold:
  image/<imgid>.jpg
  train_test_split/train_list.txt and test_list_{800,1600,2400}.txt, lines "<imgid> <vehicle_id>"
"""

  def _split_records(self, dl_manager) -> dict[str, list[reid_base.Record]]:
    root = os.fspath(dl_manager.manual_dir)
    inst = self.MANUAL_DOWNLOAD_INSTRUCTIONS
    reid_base.require(os.path.join(root, "image"), "the image folder (image/<imgid>.jpg)",
                      inst)
    out = {}
    for split, list_name in (("train", "train_list.txt"),
                             ("test", self.builder_config.test_list)):
      list_path = os.path.join(root, "train_test_split", list_name)
      rows = reid_base.read_list(list_path, 'lines "<imgid> <vehicle_id>"', inst)
      records = []
      for line_no, row in enumerate(rows, 1):
        if len(row) != 2 or not row[1].isdigit():
          raise reid_base.ManualDataError(
              f"{list_path}:{line_no}: expected \"<imgid> <vehicle_id>\", got {' '.join(row)!r}")
        name = row[0] if row[0].lower().endswith(".jpg") else row[0] + ".jpg"
        records.append(reid_base.Record(
            path=os.path.join(root, "image", name), file_name=f"image/{name}",
            vehicle_id=int(row[1])))
      out[split] = records
    return out
