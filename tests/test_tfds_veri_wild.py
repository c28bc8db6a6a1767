"""VERI-Wild builder on tiny generated folders in both list formats."""

import collections
import io
import os

import numpy as np
from PIL import Image
import pytest

from configs import veriwild
from musp_jax.data import datasets
from tfds_builders import reid_base

# (vid, imgid, camera, model, type, colour)
TRAIN = [(3, 11, 5, "Audi", "sedan", "black"), (3, 12, 6, "Audi", "sedan", "black"),
         (1, 13, 5, "VW", "SUV", "white"), (8, 14, 100, "BYD", "MPV", "red")]
QUERY = [(20, 21, 7, "Ford", "sedan", "blue"), (22, 22, 8, "Kia", "van", "grey")]
GALLERY = [(20, 23, 9, "Ford", "sedan", "blue"), (22, 24, 174, "Kia", "van", "grey"),
           (25, 25, 2, "Geely", "SUV", "brown")]
# The larger test sets of the download (N = 5000, 10000): (query, gallery) rows.
LARGER = {5000: ([(30, 31, 3, "Fiat", "sedan", "white")],
                 [(30, 32, 4, "Fiat", "sedan", "white"), (20, 23, 9, "Ford", "sedan", "blue")]),
          10000: ([(40, 41, 5, "Jeep", "SUV", "green"), (22, 22, 8, "Kia", "van", "grey")],
                  [(40, 42, 6, "Jeep", "SUV", "green")])}
HEADER = "id/image;Camera ID;Time;Model;Type;Color\n"


def write_veri_wild(root, *, list_format, header, all_sizes=False):
  """Writes images, lists and vehicle_info.txt; returns {file name: pixels}.

  Only the 3,000-id test set, or with `all_sizes` the three of the download."""
  pixels = {}
  split_dir = root / "train_test_split"
  os.makedirs(split_dir)
  tests = {3000: (QUERY, GALLERY), **(LARGER if all_sizes else {})}
  everything = TRAIN + [r for q, g in tests.values() for r in q + g]
  for vid, img, *_ in everything:
    os.makedirs(root / "images" / f"{vid:05d}", exist_ok=True)
    px = np.full((28, 36, 3), (img * 41) % 256, np.uint8)
    Image.fromarray(px).save(root / "images" / f"{vid:05d}" / f"{img:06d}.jpg", quality=95)
    pixels[f"images/{vid:05d}/{img:06d}.jpg"] = px
  if list_format == "key":
    names = {"train_list.txt": TRAIN}
    for n, (q, g) in tests.items():
      names.update({f"test_{n}_query.txt": q, f"test_{n}.txt": g})
    line = lambda k, r: f"{r[0]:05d}/{r[1]:06d}\n"
  else:  # "<relpath> <label> <camid>", label 0-based (ignored), relpath under images/
    names = {"train_list_start0.txt": TRAIN}
    for n, (q, g) in tests.items():
      names.update({f"test_{n}_id_query.txt": q, f"test_{n}_id.txt": g})
    line = lambda k, r: f"images/{r[0]:05d}/{r[1]:06d}.jpg {k} {r[2]}\n"
  for name, rows in names.items():
    with open(split_dir / name, "w") as f:
      f.write("".join(line(k, r) for k, r in enumerate(rows)))
  with open(split_dir / "vehicle_info.txt", "w") as f:
    f.write((HEADER if header else "") + "".join(
        f"{v:05d}/{i:06d};{c:03d};2018-03-11 11:41:19;{m};{t};{col}\n"
        for v, i, c, m, t, col in dict.fromkeys(everything)))
  return pixels


@pytest.mark.parametrize("list_format,header", [("key", True), ("key", False),
                                                ("relpath", True), ("relpath", False)])
def test_builds_both_list_formats(tmp_path, list_format, header):
  pixels = write_veri_wild(tmp_path / "VERI-Wild", list_format=list_format, header=header)
  data_dir = str(tmp_path / "tfds")
  report = datasets.build("veri_wild", data_dir=data_dir, builder_config="",
                          manual_dir=str(tmp_path / "VERI-Wild"))
  assert report.num_examples == {"train": 4, "query_3000": 2, "gallery_3000": 3}
  for split, rows in (("train", TRAIN), ("query_3000", QUERY), ("gallery_3000", GALLERY)):
    src = datasets.load_split("veri_wild", split, data_dir=data_dir, builder_config="")
    got = [(r["vehicle_id"], r["camera_id"], r["metadata"]["model"], r["metadata"]["type"],
            r["metadata"]["color"]) for r in src]
    assert got == [(v, c, m, t, col) for v, _, c, m, t, col in rows]
    labels = [r["label"] for r in src]
    assert labels == ([1, 1, 0, 2] if split == "train" else [-1] * len(rows))
    for r in src:
      decoded = np.asarray(Image.open(io.BytesIO(r["image"])), np.int16)
      assert np.abs(decoded - pixels[r["file_name"]]).max() <= 3
    index = datasets.split_index("veri_wild", split, data_dir=data_dir, builder_config="")
    np.testing.assert_array_equal(index["camera_id"], [c for _, _, c, *_ in rows])
    np.testing.assert_array_equal(index["label"], labels)


def test_relpath_lists_without_vehicle_info_use_list_cameras(tmp_path):
  write_veri_wild(tmp_path / "VW", list_format="relpath", header=False)
  os.remove(tmp_path / "VW" / "train_test_split" / "vehicle_info.txt")
  datasets.build("veri_wild", data_dir=str(tmp_path / "tfds"), builder_config="",
                 manual_dir=str(tmp_path / "VW"))
  index = datasets.split_index("veri_wild", "gallery_3000", data_dir=str(tmp_path / "tfds"),
                               builder_config="")
  np.testing.assert_array_equal(index["camera_id"], [c for _, _, c, *_ in GALLERY])


def test_key_lists_need_vehicle_info(tmp_path):
  write_veri_wild(tmp_path / "VW", list_format="key", header=True)
  os.remove(tmp_path / "VW" / "train_test_split" / "vehicle_info.txt")
  with pytest.raises(reid_base.ManualDataError) as e:
    datasets.build("veri_wild", data_dir=str(tmp_path / "tfds"), builder_config="",
                   manual_dir=str(tmp_path / "VW"))
  assert f"Missing {tmp_path / 'VW' / 'train_test_split' / 'vehicle_info.txt'}" in str(e.value)


def test_missing_list_names_both_formats(tmp_path):
  write_veri_wild(tmp_path / "VW", list_format="key", header=True)
  os.remove(tmp_path / "VW" / "train_test_split" / "test_3000_query.txt")
  with pytest.raises(reid_base.ManualDataError,
                     match=r"test_3000_query.txt \(or test_3000_id_query.txt\): expected the "
                     "query list of the 3000-id test set"):
    datasets.build("veri_wild", data_dir=str(tmp_path / "tfds"), builder_config="",
                   manual_dir=str(tmp_path / "VW"))
  os.remove(tmp_path / "VW" / "train_test_split" / "test_3000.txt")
  with pytest.raises(reid_base.ManualDataError, match=r"No test set in .*train_test_split"):
    datasets.build("veri_wild", data_dir=str(tmp_path / "tfds"), builder_config="",
                   manual_dir=str(tmp_path / "VW"))


def test_malformed_list_line_is_named(tmp_path):
  write_veri_wild(tmp_path / "VW", list_format="key", header=True)
  with open(tmp_path / "VW" / "train_test_split" / "train_list.txt", "a") as f:
    f.write("a b\n")
  with pytest.raises(reid_base.ManualDataError, match=r"train_list.txt:5: expected"):
    datasets.build("veri_wild", data_dir=str(tmp_path / "tfds"), builder_config="",
                   manual_dir=str(tmp_path / "VW"))


def test_all_test_sizes_share_one_build_and_training_images_are_written_once(
    tmp_path, monkeypatch):
  write_veri_wild(tmp_path / "VW", list_format="key", header=True, all_sizes=True)
  reads = collections.Counter()
  real_read = reid_base.ReIdBuilder._read_image

  def counting_read(self, rec):
    reads[rec.file_name] += 1
    return real_read(self, rec)

  monkeypatch.setattr(reid_base.ReIdBuilder, "_read_image", counting_read)
  data_dir = tmp_path / "tfds"
  report = datasets.build("veri_wild", data_dir=str(data_dir), builder_config="",
                          manual_dir=str(tmp_path / "VW"))
  train_files = [f"images/{v:05d}/{i:06d}.jpg" for v, i, *_ in TRAIN]
  assert [reads[f] for f in train_files] == [1, 1, 1, 1]
  assert report.num_examples == {"train": 4, "query_3000": 2, "gallery_3000": 3,
                                 "query_5000": 1, "gallery_5000": 2,
                                 "query_10000": 2, "gallery_10000": 1}
  assert [p.name for p in (data_dir / "veri_wild").iterdir()] == ["2.0.0"]  # one build
  # Evaluation picks the test set by eval.test_size.
  config = veriwild.get_config()
  config.dataset.data_dir = str(data_dir)
  for size, (query, gallery) in {"small": (QUERY, GALLERY), "medium": LARGER[5000],
                                 "large": LARGER[10000]}.items():
    config.eval.test_size = size
    (target,) = datasets.eval_sets(config)
    for role, rows in (("query", query), ("gallery", gallery)):
      index = datasets.split_index("veri_wild", target.splits[role], data_dir=str(data_dir),
                                   builder_config="")
      np.testing.assert_array_equal(index["vehicle_id"], [v for v, *_ in rows])
