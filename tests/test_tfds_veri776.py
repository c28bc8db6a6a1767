"""VeRi-776 builder on a tiny generated folder in the real layout."""

import io
import os

import numpy as np
from PIL import Image
import pytest

from musp_jax.data import datasets
from tfds_builders import reid_base


def _pixels(seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return np.broadcast_to(rng.integers(0, 256, 3, dtype=np.uint8), (24, 32, 3)).copy()


# split -> (folder, list, [(vehicle id, camera)])
LAYOUT = {
    "train": ("image_train", "name_train.txt", [(5, 1), (5, 2), (2, 3), (9, 1), (9, 4)]),
    "query": ("image_query", "name_query.txt", [(11, 2), (12, 3)]),
    "gallery": ("image_test", "name_test.txt", [(11, 1), (11, 5), (12, 2), (12, 20)]),
}


def write_veri(root, *, with_xml=True):
  """Writes the layout; returns {file name: (pixels, vid, cam, color, type)}."""
  expected = {}
  train_xml, test_xml = [], []
  for split, (folder, list_name, items) in LAYOUT.items():
    os.makedirs(os.path.join(root, folder), exist_ok=True)
    names = []
    for k, (vid, cam) in enumerate(items):
      name = f"{vid:04d}_c{cam:03d}_{1000 + k:08d}_0.jpg"
      px = _pixels(len(expected))
      Image.fromarray(px).save(os.path.join(root, folder, name), quality=95)
      color, vtype = vid % 10, vid % 9
      expected[f"{folder}/{name}"] = (px, vid, cam, color, vtype)
      names.append(name)
      item = (f'<Item imageName="{name}" vehicleID="{vid:04d}" cameraID="c{cam:03d}" '
              f'colorID="{color}" typeID="{vtype}" />')
      (train_xml if split == "train" else test_xml).append(item)
    # Lists are not sorted on disk: the builder sorts them.
    with open(os.path.join(root, list_name), "w") as f:
      f.write("\n".join(reversed(names)) + "\n")
  if with_xml:
    for xml_name, items in (("train_label.xml", train_xml), ("test_label.xml", test_xml)):
      with open(os.path.join(root, xml_name), "wb") as f:
        # The real files declare gb2312, which Python's expat refuses to parse directly.
        f.write(('<?xml version="1.0" encoding="gb2312"?>\n<TrainingImages Version="1.0">'
                 f'<Items number="{len(items)}">' + "".join(items) +
                 "</Items></TrainingImages>").encode("ascii"))
  return expected


def test_builds_veri_layout(tmp_path):
  manual = tmp_path / "VeRi"
  expected = write_veri(manual)
  data_dir = str(tmp_path / "tfds")
  report = datasets.build("veri776", data_dir=data_dir, builder_config="",
                          manual_dir=str(manual))
  assert report.num_examples == {"train": 5, "query": 2, "gallery": 4}
  assert report.skipped == []
  for split, (folder, _, items) in LAYOUT.items():
    src = datasets.load_split("veri776", split, data_dir=data_dir, builder_config="")
    records = [src[i] for i in range(len(src))]
    names = [r["file_name"] for r in records]
    assert names == sorted(f"{folder}/" + n.split("/")[-1] for n in names)
    assert sorted((r["vehicle_id"], r["camera_id"]) for r in records) == sorted(items)
    for r in records:
      px, vid, cam, color, vtype = expected[r["file_name"]]
      assert (r["vehicle_id"], r["camera_id"]) == (vid, cam)
      assert r["metadata"] == {"color": color, "type": vtype}
      with open(os.path.join(manual, r["file_name"]), "rb") as f:
        assert r["image"] == f.read()  # JPEG stored unchanged
      decoded = np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB"), np.int16)
      assert np.abs(decoded - px).max() <= 3
    if split == "train":
      # Sorted ids 2, 5, 9 -> labels 0, 1, 2.
      assert [r["label"] for r in records] == [{2: 0, 5: 1, 9: 2}[r["vehicle_id"]]
                                               for r in records]
    else:
      assert all(r["label"] == -1 for r in records)
    index = datasets.split_index("veri776", split, data_dir=data_dir, builder_config="")
    np.testing.assert_array_equal(index["vehicle_id"], [r["vehicle_id"] for r in records])
    np.testing.assert_array_equal(index["camera_id"], [r["camera_id"] for r in records])
    np.testing.assert_array_equal(index["label"], [r["label"] for r in records])
  assert datasets.num_classes("veri776", data_dir=data_dir, builder_config="") == 3


def test_label_xml_is_optional(tmp_path):
  write_veri(tmp_path / "VeRi", with_xml=False)
  datasets.build("veri776", data_dir=str(tmp_path / "tfds"), builder_config="",
                 manual_dir=str(tmp_path / "VeRi"))
  src = datasets.load_split("veri776", "query", data_dir=str(tmp_path / "tfds"),
                            builder_config="")
  assert src[0]["metadata"] == {"color": -1, "type": -1}


def test_missing_list_names_path_and_instructions(tmp_path):
  write_veri(tmp_path / "VeRi")
  os.remove(tmp_path / "VeRi" / "name_query.txt")
  with pytest.raises(reid_base.ManualDataError) as e:
    datasets.build("veri776", data_dir=str(tmp_path / "tfds"), builder_config="",
                   manual_dir=str(tmp_path / "VeRi"))
  msg = str(e.value)
  assert str(tmp_path / "VeRi" / "name_query.txt") in msg
  assert "the query image names" in msg and "Manual download instructions" in msg
  assert not (tmp_path / "tfds" / "veri776" / "1.0.0").exists()


def test_bad_file_name_is_reported_with_its_line(tmp_path):
  write_veri(tmp_path / "VeRi")
  with open(tmp_path / "VeRi" / "name_train.txt", "a") as f:
    f.write("car.jpg\n")
  with pytest.raises(reid_base.ManualDataError, match=r"name_train.txt:6: 'car.jpg'"):
    datasets.build("veri776", data_dir=str(tmp_path / "tfds"), builder_config="",
                   manual_dir=str(tmp_path / "VeRi"))
