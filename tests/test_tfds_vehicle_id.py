"""VehicleID builder on a tiny generated folder in the real layout."""

import io
import os

import numpy as np
from PIL import Image
import pytest

from musp_jax.data import datasets
from tfds_builders import reid_base

TRAIN = [("0005", 30), ("0001", 7), ("0002", 30), ("0009", 12)]
TESTS = {"test_list_800.txt": [("0100", 40), ("0101", 40), ("0102", 41)],
         "test_list_1600.txt": [("0100", 40), ("0103", 42), ("0104", 42), ("0102", 41)],
         "test_list_2400.txt": [("0105", 43), ("0106", 43)]}


def write_vehicle_id(root):
  pixels = {}
  os.makedirs(root / "image")
  os.makedirs(root / "train_test_split")
  rows = {"train_list.txt": TRAIN, **TESTS}
  for list_name, items in rows.items():
    for imgid, _ in items:
      if imgid not in pixels:
        pixels[imgid] = np.full((20, 30, 3), (len(pixels) * 37) % 256, np.uint8)
        Image.fromarray(pixels[imgid]).save(root / "image" / f"{imgid}.jpg", quality=95)
    with open(root / "train_test_split" / list_name, "w") as f:
      f.write("".join(f"{i} {v}\n" for i, v in items))
  return pixels


def test_builds_every_test_list_in_one_build(tmp_path):
  pixels = write_vehicle_id(tmp_path / "VehicleID")
  data_dir = str(tmp_path / "tfds")
  report = datasets.build("vehicle_id", data_dir=data_dir, builder_config="",
                          manual_dir=str(tmp_path / "VehicleID"))
  assert report.num_examples == {"train": 4, "test_800": 3, "test_1600": 4, "test_2400": 2}
  kw = dict(data_dir=data_dir, builder_config="")
  train = datasets.load_split("vehicle_id", "train", **kw)
  # Sorted ids 7, 12, 30 -> labels 0, 1, 2.
  assert [r["label"] for r in train] == [2, 0, 2, 1]
  assert datasets.num_classes("vehicle_id", **kw) == 3
  for list_name, size in (("test_list_800.txt", 800), ("test_list_1600.txt", 1600),
                          ("test_list_2400.txt", 2400)):
    test = datasets.load_split("vehicle_id", f"test_{size}", **kw)
    # List order kept (the protocol's "first listed image" variant depends on it).
    assert [(r["file_name"], r["vehicle_id"]) for r in test] == [
        (f"image/{i}.jpg", v) for i, v in TESTS[list_name]]
    assert all(r["label"] == -1 and r["camera_id"] == -1 for r in test)
    index = datasets.split_index("vehicle_id", f"test_{size}", **kw)
    np.testing.assert_array_equal(index["vehicle_id"], [v for _, v in TESTS[list_name]])
    np.testing.assert_array_equal(index["camera_id"], -1)
    for r in list(train) + list(test):
      imgid = r["file_name"][len("image/"):-len(".jpg")]
      decoded = np.asarray(Image.open(io.BytesIO(r["image"])), np.int16)
      assert np.abs(decoded - pixels[imgid]).max() <= 3


def test_malformed_line_is_named(tmp_path):
  write_vehicle_id(tmp_path / "VehicleID")
  with open(tmp_path / "VehicleID" / "train_test_split" / "train_list.txt", "a") as f:
    f.write("0007\n")
  with pytest.raises(reid_base.ManualDataError,
                     match=r"train_list.txt:5: expected \"<imgid> <vehicle_id>\""):
    datasets.build("vehicle_id", data_dir=str(tmp_path / "tfds"), builder_config="",
                   manual_dir=str(tmp_path / "VehicleID"))


def test_test_lists_present_are_built_and_none_is_an_error(tmp_path):
  root = tmp_path / "VehicleID"
  write_vehicle_id(root)
  os.remove(root / "train_test_split" / "test_list_2400.txt")
  data_dir = str(tmp_path / "tfds")
  report = datasets.build("vehicle_id", data_dir=data_dir, builder_config="",
                          manual_dir=str(root))
  assert sorted(report.num_examples) == ["test_1600", "test_800", "train"]
  with pytest.raises(ValueError, match=r"has splits \['test_1600', 'test_800', 'train'\], "
                     "not 'test_2400'"):
    datasets.load_split("vehicle_id", "test_2400", data_dir=data_dir, builder_config="")
  for n in (800, 1600):
    os.remove(root / "train_test_split" / f"test_list_{n}.txt")
  with pytest.raises(reid_base.ManualDataError) as e:
    datasets.build("vehicle_id", data_dir=str(tmp_path / "tfds2"), builder_config="",
                   manual_dir=str(root))
  assert f"No test list in {root / 'train_test_split'}" in str(e.value)
  assert "test_list_800.txt, test_list_1600.txt, test_list_2400.txt" in str(e.value)
  assert "Manual download instructions" in str(e.value)
