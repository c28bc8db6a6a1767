"""The build entry point: success, missing folders, unreadable images (skip or --strict)."""

import io
import os

from absl.testing import flagsaver
import numpy as np
from PIL import Image
import pytest

from musp_jax import build_dataset
from musp_jax.data import datasets


def write_vehicle_id(root, *, bad=None):
  """Four good images plus `bad` (name -> bytes) listed in train_list.txt."""
  os.makedirs(root / "image")
  os.makedirs(root / "train_test_split")
  rows = []
  for k in range(4):
    Image.fromarray(np.full((16, 16, 3), 40 * k, np.uint8)).save(root / "image" / f"{k}.jpg")
    rows.append(f"{k} {k // 2 + 1}")
  for k, (name, data) in enumerate((bad or {}).items()):
    if data is not None:
      (root / "image" / f"{name}.jpg").write_bytes(data)
    rows.append(f"{name} {10 + k}")
  (root / "train_test_split" / "train_list.txt").write_text("\n".join(rows) + "\n")
  (root / "train_test_split" / "test_list_800.txt").write_text("0 1\n2 2\n")


def run(*args, **flag_values):
  with flagsaver.flagsaver(**flag_values):
    return build_dataset.main(["build_dataset", *args])


def _truncated_jpeg() -> bytes:
  buf = io.BytesIO()
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
  return buf.getvalue()[: len(buf.getvalue()) // 2]


BAD = {"truncated": _truncated_jpeg(), "notanimage": b"this is text", "missing": None}


def test_builds_and_reports_sizes(tmp_path, capsys):
  assert run("synthetic_vehicles", data_dir=str(tmp_path), config="tiny") == 0
  out = capsys.readouterr().out
  assert f"Built synthetic_vehicles/tiny in {tmp_path}" in out and "train: 128" in out
  assert datasets.num_classes("synthetic_vehicles", data_dir=str(tmp_path),
                              builder_config="tiny") == 16


def test_missing_manual_dir_prints_instructions(tmp_path, capsys):
  assert run("veri776", data_dir=str(tmp_path), manual_dir=str(tmp_path / "nope")) == 1
  err = capsys.readouterr().err
  assert f"Missing {tmp_path / 'nope'}: expected the veri776 manual download folder" in err
  assert "name_train.txt" in err  # the instructions
  assert run("veri776", data_dir=str(tmp_path)) == 1
  assert "needs --manual_dir" in capsys.readouterr().err


def test_missing_image_folder_is_named(tmp_path, capsys):
  write_vehicle_id(tmp_path / "VID")
  os.rename(tmp_path / "VID" / "image", tmp_path / "VID" / "images")
  assert run("vehicle_id", data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path / "VID")) == 1
  err = capsys.readouterr().err
  assert f"Missing {tmp_path / 'VID' / 'image'}: expected the image folder" in err
  assert "Manual download instructions" in err


def test_unreadable_images_are_skipped_and_counted(tmp_path, capsys):
  write_vehicle_id(tmp_path / "VID", bad=BAD)
  data_dir = str(tmp_path / "tfds")
  assert run("vehicle_id", data_dir=data_dir, manual_dir=str(tmp_path / "VID")) == 0
  out = capsys.readouterr().out
  assert "Skipped 3 unreadable images" in out
  for name in BAD:
    assert f"image/{name}.jpg" in out
  src = datasets.load_split("vehicle_id", "train", data_dir=data_dir, builder_config="")
  assert [r["file_name"] for r in src] == [f"image/{k}.jpg" for k in range(4)]
  # Labels stay those of the listed identities (ids 1, 2 and the bad images' 10-12).
  index = datasets.split_index("vehicle_id", "train", data_dir=data_dir, builder_config="")
  np.testing.assert_array_equal(index["label"], [0, 0, 1, 1])


def test_strict_fails_on_the_first_unreadable_image(tmp_path, capsys):
  write_vehicle_id(tmp_path / "VID", bad={"truncated": BAD["truncated"]})
  data_dir = tmp_path / "tfds"
  assert run("vehicle_id", data_dir=str(data_dir), manual_dir=str(tmp_path / "VID"),
             strict=True) == 1
  assert "Unreadable image image/truncated.jpg" in capsys.readouterr().err
  assert not datasets.is_built("vehicle_id", data_dir=str(data_dir), builder_config="")


def test_unknown_dataset_is_a_usage_error(capsys):
  with pytest.raises(SystemExit) as e:
    run("veri")
  assert e.value.code == 2
  assert "error: give one dataset name: veri776 | vehicle_id" in capsys.readouterr().err


def test_a_changed_manual_folder_is_rebuilt(tmp_path, capsys):
  """The build records the folder's lists and file sizes; a fixed folder is seen."""
  manual, data_dir = tmp_path / "VID", str(tmp_path / "tfds")
  write_vehicle_id(manual, bad={"missing": None})
  assert run("vehicle_id", data_dir=data_dir, manual_dir=str(manual)) == 0
  assert "train: 4)" in capsys.readouterr().out  # the missing image is skipped
  assert run("vehicle_id", data_dir=data_dir, manual_dir=str(manual)) == 0
  out = capsys.readouterr().out
  assert "Rebuilt" not in out and "train: 4)" in out  # unchanged: reused
  Image.fromarray(np.full((16, 16, 3), 99, np.uint8)).save(manual / "image" / "missing.jpg")
  assert run("vehicle_id", data_dir=data_dir, manual_dir=str(manual)) == 0
  out = capsys.readouterr().out
  assert (f"Rebuilt vehicle_id, replacing the last build: the manual folder {manual} "
          "changed since: 5 files besides the lists, 4 at the last build.") in out
  assert "train: 5)" in out
  index = datasets.split_index("vehicle_id", "train", data_dir=data_dir, builder_config="")
  np.testing.assert_array_equal(index["vehicle_id"], [1, 1, 2, 2, 10])
  # An edited list is seen too; a failed rebuild keeps the last build.
  (manual / "train_test_split" / "train_list.txt").write_text("")
  assert run("vehicle_id", data_dir=data_dir, manual_dir=str(manual)) == 1
  err = capsys.readouterr().err
  assert (f"error: {manual / 'train_test_split' / 'train_list.txt'} is empty: expected "
          'lines "<imgid> <vehicle_id>".') in err.splitlines()
  assert len(datasets.load_split("vehicle_id", "train", data_dir=data_dir,
                                 builder_config="")) == 5
  assert sorted(os.listdir(tmp_path / "tfds" / "vehicle_id")) == ["2.0.0"]
