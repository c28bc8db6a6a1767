"""vehicle_id: VehicleID (no cameras; train 13,164 ids; test lists of 800/1600/2400 ids).

    python -m musp_jax.build_dataset vehicle_id --manual_dir DIR

One build holds the training images once and every test list the download has, each
as a split `test_<N>` (N = 800, 1600, 2400) in list order (the evaluation protocol
forms query and gallery from it); evaluation picks one with `eval.test_size`.
"""

from __future__ import annotations

import os

import tensorflow_datasets as tfds

from tfds_builders import reid_base


class Builder(reid_base.ReIdBuilder):
  """VehicleID: the training list and every test list as splits."""

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {
      "1.0.0": "First release.",
      "2.0.0": "One build with every test list as a split test_<N>; no builder configs.",
  }
  TEST_SIZES = {"small": 800, "medium": 1600, "large": 2400}
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
    lists = {"train": "train_list.txt"}
    for n in self.TEST_SIZES.values():
      if os.path.exists(os.path.join(root, "train_test_split", f"test_list_{n}.txt")):
        lists[f"test_{n}"] = f"test_list_{n}.txt"
    if len(lists) == 1:
      names = ", ".join(f"test_list_{n}.txt" for n in self.TEST_SIZES.values())
      raise reid_base.ManualDataError(
          f"No test list in {os.path.join(root, 'train_test_split')}: expected at least one "
          f"of {names}.\n\nManual download instructions:\n{inst}")
    out = {}
    for split, list_name in lists.items():
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
