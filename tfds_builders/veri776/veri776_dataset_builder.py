"""veri776: VeRi-776 (20 cameras; train 576 ids, query 1,678, gallery 11,579 images).

    python -m musp_jax.build_dataset veri776 --manual_dir DIR
"""

from __future__ import annotations

import os
import re
from xml.etree import ElementTree

import numpy as np
import tensorflow_datasets as tfds

from tfds_builders import reid_base

_NAME = re.compile(r"^(\d+)_c(\d+)_")
# (split, image folder, name list)
_SPLITS = (("train", "image_train", "name_train.txt"),
           ("query", "image_query", "name_query.txt"),
           ("gallery", "image_test", "name_test.txt"))


class Builder(reid_base.ReIdBuilder):
  """VeRi-776 with colour and type metadata from the label XML files."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  METADATA_FEATURES = {"color": np.int64, "type": np.int64}
  DESCRIPTION = "VeRi-776 vehicle re-identification; metadata color/type are -1 if unknown."
  HOMEPAGE = "https://vehiclereid.github.io/VeRi/"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Request VeRi-776 from its authors (https://vehiclereid.github.io/VeRi/), extract it, and
pass the extracted folder as --manual_dir. It must hold:
  image_train/, image_query/, image_test/   JPEGs named VVVV_cCCC_FFFFFFFF_N.jpg
  name_train.txt, name_query.txt, name_test.txt   one image file name per line
  train_label.xml, test_label.xml   (optional) colour and type of each image
"""

  def _split_records(self, dl_manager) -> dict[str, list[reid_base.Record]]:
    root = os.fspath(dl_manager.manual_dir)
    inst = self.MANUAL_DOWNLOAD_INSTRUCTIONS
    meta = {}
    for xml_name in ("train_label.xml", "test_label.xml"):
      meta.update(_read_labels(os.path.join(root, xml_name)))
    out = {}
    for split, folder, list_name in _SPLITS:
      reid_base.require(os.path.join(root, folder), f"the folder of {split} images", inst)
      list_path = os.path.join(root, list_name)
      rows = reid_base.read_list(list_path, f"the {split} image names, one per line", inst)
      records = []
      for line_no, row in enumerate(rows, 1):
        name = row[0]
        m = _NAME.match(name)
        if m is None:
          raise reid_base.ManualDataError(
              f"{list_path}:{line_no}: {name!r} is not a VeRi name VVVV_cCCC_FFFFFFFF_N.jpg")
        color, vtype = meta.get(name, (-1, -1))
        records.append(reid_base.Record(
            path=os.path.join(root, folder, name), file_name=f"{folder}/{name}",
            vehicle_id=int(m.group(1)), camera_id=int(m.group(2)),
            metadata={"color": color, "type": vtype}))
      out[split] = sorted(records, key=lambda r: r.file_name)
    return out


def _read_labels(path: str) -> dict[str, tuple[int, int]]:
  """imageName -> (colorID, typeID) from a VeRi label XML file; {} if it is absent."""
  if not os.path.exists(path):
    return {}
  with open(path, "rb") as f:
    raw = f.read()
  # The files declare encoding="gb2312", which expat cannot parse; the content is ASCII.
  m = re.match(rb"<\?xml[^>]*encoding=[\"']([\w-]+)[\"'][^>]*\?>", raw)
  encoding = m.group(1).decode() if m else "utf-8"
  if encoding.lower() in ("gb2312", "gbk"):
    encoding = "gb18030"  # a superset that decodes every gb2312 byte sequence
  text = re.sub(r"^\s*<\?xml[^>]*\?>", "", raw.decode(encoding, errors="replace"))
  try:
    root = ElementTree.fromstring(text)
  except ElementTree.ParseError as e:
    raise reid_base.ManualDataError(f"{path}: cannot parse the label XML ({e}).") from e
  out = {}
  for item in root.iter("Item"):
    name = item.get("imageName")
    if name:
      out[name] = (int(item.get("colorID", -1)), int(item.get("typeID", -1)))
  return out
