"""VERI-Wild builder on tiny generated folders in both list formats."""

import io
import os

import numpy as np
from PIL import Image
import pytest

from musp_jax import datasets
from tfds_builders import reid_base

# (vid, imgid, camera, model, type, colour)
TRAIN = [(3, 11, 5, "Audi", "sedan", "black"), (3, 12, 6, "Audi", "sedan", "black"),
         (1, 13, 5, "VW", "SUV", "white"), (8, 14, 100, "BYD", "MPV", "red")]
QUERY = [(20, 21, 7, "Ford", "sedan", "blue"), (22, 22, 8, "Kia", "van", "grey")]
GALLERY = [(20, 23, 9, "Ford", "sedan", "blue"), (22, 24, 174, "Kia", "van", "grey"),
           (25, 25, 2, "Geely", "SUV", "brown")]
HEADER = "id/image;Camera ID;Time;Model;Type;Color\n"


def write_veri_wild(root, *, list_format, header):
  """Writes images, lists and vehicle_info.txt; returns {file name: pixels}."""
  pixels = {}
  split_dir = root / "train_test_split"
  os.makedirs(split_dir)
  for vid, img, *_ in TRAIN + QUERY + GALLERY:
    os.makedirs(root / "images" / f"{vid:05d}", exist_ok=True)
    px = np.full((28, 36, 3), (img * 41) % 256, np.uint8)
    Image.fromarray(px).save(root / "images" / f"{vid:05d}" / f"{img:06d}.jpg", quality=95)
    pixels[f"images/{vid:05d}/{img:06d}.jpg"] = px
  if list_format == "key":
    names = {"train_list.txt": TRAIN, "test_3000_query.txt": QUERY, "test_3000.txt": GALLERY}
    line = lambda k, r: f"{r[0]:05d}/{r[1]:06d}\n"
  else:  # "<relpath> <label> <camid>", label 0-based (ignored), relpath under images/
    names = {"train_list_start0.txt": TRAIN, "test_3000_id_query.txt": QUERY,
             "test_3000_id.txt": GALLERY}
    line = lambda k, r: f"images/{r[0]:05d}/{r[1]:06d}.jpg {k} {r[2]}\n"
  for name, rows in names.items():
    with open(split_dir / name, "w") as f:
      f.write("".join(line(k, r) for k, r in enumerate(rows)))
  with open(split_dir / "vehicle_info.txt", "w") as f:
    f.write((HEADER if header else "") + "".join(
        f"{v:05d}/{i:06d};{c:03d};2018-03-11 11:41:19;{m};{t};{col}\n"
        for v, i, c, m, t, col in TRAIN + QUERY + GALLERY))
  return pixels


@pytest.mark.parametrize("list_format,header", [("key", True), ("key", False),
                                                ("relpath", True), ("relpath", False)])
def test_builds_both_list_formats(tmp_path, list_format, header):
  pixels = write_veri_wild(tmp_path / "VERI-Wild", list_format=list_format, header=header)
  data_dir = str(tmp_path / "tfds")
  report = datasets.build("veri_wild", data_dir=data_dir, builder_config="small",
                          manual_dir=str(tmp_path / "VERI-Wild"))
  assert report.num_examples == {"train": 4, "query": 2, "gallery": 3}
  for split, rows in (("train", TRAIN), ("query", QUERY), ("gallery", GALLERY)):
    src = datasets.load_split("veri_wild", split, data_dir=data_dir, builder_config="small")
    got = [(r["vehicle_id"], r["camera_id"], r["metadata"]["model"], r["metadata"]["type"],
            r["metadata"]["color"]) for r in src]
    assert got == [(v, c, m, t, col) for v, _, c, m, t, col in rows]
    labels = [r["label"] for r in src]
    assert labels == ([1, 1, 0, 2] if split == "train" else [-1] * len(rows))
    for r in src:
      decoded = np.asarray(Image.open(io.BytesIO(r["image"])), np.int16)
      assert np.abs(decoded - pixels[r["file_name"]]).max() <= 3
    index = datasets.split_index("veri_wild", split, data_dir=data_dir,
                                 builder_config="small")
    np.testing.assert_array_equal(index["camera_id"], [c for _, _, c, *_ in rows])
    np.testing.assert_array_equal(index["label"], labels)


def test_relpath_lists_without_vehicle_info_use_list_cameras(tmp_path):
  write_veri_wild(tmp_path / "VW", list_format="relpath", header=False)
  os.remove(tmp_path / "VW" / "train_test_split" / "vehicle_info.txt")
  datasets.build("veri_wild", data_dir=str(tmp_path / "tfds"), builder_config="small",
                 manual_dir=str(tmp_path / "VW"))
  index = datasets.split_index("veri_wild", "gallery", data_dir=str(tmp_path / "tfds"),
                               builder_config="small")
  np.testing.assert_array_equal(index["camera_id"], [c for _, _, c, *_ in GALLERY])


def test_key_lists_need_vehicle_info(tmp_path):
  write_veri_wild(tmp_path / "VW", list_format="key", header=True)
  os.remove(tmp_path / "VW" / "train_test_split" / "vehicle_info.txt")
  with pytest.raises(reid_base.ManualDataError) as e:
    datasets.build("veri_wild", data_dir=str(tmp_path / "tfds"), builder_config="small",
                   manual_dir=str(tmp_path / "VW"))
  assert f"Missing {tmp_path / 'VW' / 'train_test_split' / 'vehicle_info.txt'}" in str(e.value)


def test_missing_list_names_both_formats(tmp_path):
  write_veri_wild(tmp_path / "VW", list_format="key", header=True)
  with pytest.raises(reid_base.ManualDataError,
                     match=r"test_5000_query.txt \(or .*test_5000_id_query.txt\): expected"):
    datasets.build("veri_wild", data_dir=str(tmp_path / "tfds"), builder_config="medium",
                   manual_dir=str(tmp_path / "VW"))


def test_malformed_list_line_is_named(tmp_path):
  write_veri_wild(tmp_path / "VW", list_format="key", header=True)
  with open(tmp_path / "VW" / "train_test_split" / "train_list.txt", "a") as f:
    f.write("a b\n")
  with pytest.raises(reid_base.ManualDataError, match=r"train_list.txt:5: expected"):
    datasets.build("veri_wild", data_dir=str(tmp_path / "tfds"), builder_config="small",
                   manual_dir=str(tmp_path / "VW"))
