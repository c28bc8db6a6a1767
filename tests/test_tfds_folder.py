"""The user's own images: the folder and CSV layouts, named builds side by side, the
protocol choice, and every bad layout named in one line."""

import os

from absl.testing import flagsaver
import numpy as np
from PIL import Image
import pytest

from musp_jax import build_dataset
from musp_jax.data import datasets
from tfds_builders import reid_base

# split -> [(vehicle id, camera)]. Query 101 has a gallery match from another camera
# (and a junk one from its own); 102 only a same-camera one (junk: skipped unless
# --keep_junk); 103 none at all.
ITEMS = {
    "train": [(3, 1), (3, 2), (8, 1), (8, 4), (20, 2)],
    "query": [(101, 1), (102, 2), (103, 3)],
    "gallery": [(101, 2), (101, 1), (102, 2), (104, 5)],
}


def _pixels(k: int) -> np.ndarray:
  rng = np.random.default_rng(k)
  return np.broadcast_to(rng.integers(0, 256, 3, dtype=np.uint8), (20, 28, 3)).copy()


def write_folders(root, items=ITEMS) -> dict[str, tuple]:
  """DIR/<split>/<vehicle id>/c<camera>_<k>.jpg; returns {file name: (split, vid, cam)}."""
  expected = {}
  for split, rows in items.items():
    for k, (vid, cam) in enumerate(rows):
      name = f"{split}/{vid:04d}/c{cam:03d}_{k:04d}.jpg"
      os.makedirs(root / os.path.dirname(name), exist_ok=True)
      Image.fromarray(_pixels(len(expected))).save(root / name, quality=95)
      expected[name] = (split, vid, cam)
  return expected


def write_csv(root, items=ITEMS, *, header="split,path,camera_id,vehicle_id") -> dict:
  """One CSV (its columns in another order than documented; one path absolute)."""
  os.makedirs(root / "images", exist_ok=True)
  lines, expected = [header], {}
  for split, rows in items.items():
    for vid, cam in rows:
      k = len(expected)
      name = f"images/{k:03d}.jpg"
      Image.fromarray(_pixels(k)).save(root / name, quality=95)
      path = str(root / name) if k == 0 else name
      value = {"split": split, "path": path, "camera_id": str(cam), "vehicle_id": str(vid)}
      lines.append(",".join(value[c] for c in header.split(",")))
      expected[path] = (split, vid, cam)
  (root / "labels.csv").write_text("\n".join(lines) + "\n")
  return expected


def build(root, data_dir, name, **options):
  return datasets.build("folder", data_dir=str(data_dir), builder_config=name,
                        manual_dir=str(root), options=options)


def _check_records(data_dir, name, expected, root):
  e = datasets.entry(name)
  for split in ("train", "query", "gallery"):
    source = e.load_split(split, str(data_dir))
    records = list(source)
    want = sorted((n, v) for n, v in expected.items() if v[0] == split)
    assert [r["file_name"] for r in records] == [n for n, _ in want]  # sorted
    assert [(r["vehicle_id"], r["camera_id"]) for r in records] == [
        (vid, cam) for _, (_, vid, cam) in want]
    for r in records:
      path = r["file_name"] if os.path.isabs(r["file_name"]) else root / r["file_name"]
      with open(path, "rb") as f:
        assert r["image"] == f.read()  # stored as given
    # Training labels: the sorted vehicle ids 3, 8, 20.
    labels = [r["label"] for r in records]
    assert labels == ([{3: 0, 8: 1, 20: 2}[r["vehicle_id"]] for r in records]
                      if split == "train" else [-1] * len(records))
    index = e.split_index(split, str(data_dir))
    np.testing.assert_array_equal(index["camera_id"], [r["camera_id"] for r in records])


def test_folder_and_csv_layouts_build_side_by_side(tmp_path):
  data_dir = tmp_path / "tfds"
  folders = write_folders(tmp_path / "mine")
  report = build(tmp_path / "mine", data_dir, "own_folder")
  assert report.num_examples == {"train": 5, "query": 3, "gallery": 4}
  assert report.path == str(data_dir / "folder" / "own_folder" / "1.0.0")
  assert report.findings == [
      "1 of 3 query images (1 vehicles, e.g. 103) have no gallery image of their vehicle; "
      "the protocol skips them",
      "1 of 3 query images (1 vehicles, e.g. 102) have gallery images of their vehicle "
      "only from their own camera, junk that the protocol removes (--keep_junk keeps "
      "it); the protocol skips them"]
  _check_records(data_dir, "own_folder", folders, tmp_path / "mine")
  rows = write_csv(tmp_path / "csv")
  report = build(tmp_path / "csv", data_dir, "own_csv", keep_junk=True)
  assert report.num_examples == {"train": 5, "query": 3, "gallery": 4}
  assert len(report.findings) == 1 and "e.g. 103" in report.findings[0]
  _check_records(data_dir, "own_csv", rows, tmp_path / "csv")
  # Both live in one data_dir; each evaluates by the protocol it was built with.
  assert datasets.user_datasets(str(data_dir)) == ["own_csv", "own_folder"]
  config = _config(data_dir, "own_folder", eval_dataset="own_csv,own_folder")
  assert [(t.row_name, t.protocol, t.splits) for t in datasets.eval_sets(config)] == [
      ("own_csv", "query_gallery_keep_junk", {"query": "query", "gallery": "gallery"}),
      ("own_folder", "query_gallery", {"query": "query", "gallery": "gallery"})]
  # The same command again keeps the build; another protocol rebuilds it.
  assert build(tmp_path / "mine", data_dir, "own_folder").rebuilt_because == []
  again = build(tmp_path / "mine", data_dir, "own_folder", keep_junk=True)
  assert again.rebuilt_because == [
      "the protocol changed from query_gallery to query_gallery_keep_junk (--keep_junk)"]


def _config(data_dir, name, eval_dataset=""):
  from configs import own
  config = own.get_config()
  config.dataset.name, config.dataset.data_dir = name, str(data_dir)
  config.eval.dataset = eval_dataset
  return config


def _layout_error(tmp_path, mutate, *, csv=False) -> str:
  root = tmp_path / "mine"
  (write_csv if csv else write_folders)(root)
  mutate(root)
  with pytest.raises(reid_base.ManualDataError) as e:
    build(root, tmp_path / "tfds", "mine")
  assert not datasets.is_built("folder", data_dir=str(tmp_path / "tfds"),
                               builder_config="mine")
  message = str(e.value)
  assert "\n" not in message, message
  return message


def _append(line):  # a CSV line in write_csv's column order
  def mutate(root):
    with open(root / "labels.csv", "a") as f:
      f.write(line + "\n")
  return mutate


def _replace_header(header):
  def mutate(root):
    text = (root / "labels.csv").read_text().split("\n", 1)[1]
    (root / "labels.csv").write_text(header + "\n" + text)
  return mutate


def _drop_split(split):
  def mutate(root):
    lines = (root / "labels.csv").read_text().splitlines()
    (root / "labels.csv").write_text("\n".join(
        line for line in lines if not line.startswith(split + ",")) + "\n")
  return mutate


def _touch(name, data=b""):
  def mutate(root):
    os.makedirs(root / os.path.dirname(name), exist_ok=True)
    (root / name).write_bytes(data)
  return mutate


# (layout, mutation, the error's text with {root} for the folder)
BAD_LAYOUTS = [
    ("folders", lambda r: os.rename(r / "query", r / "queries"),
     "Missing {root}/query: expected the query split, folders <vehicle id>/ of images "
     "<camera id>_<anything>.jpg"),
    ("folders", _touch("train/car7/c001_0.jpg"),
     "{root}/train/car7: folder name 'car7' is not a vehicle id (a non-negative integer)"),
    ("folders", _touch("train/0003/0001.jpg"),
     "{root}/train/0003/0001.jpg: expected an image named <camera id>_<anything> (.jpg, "
     ".jpeg or .png), e.g. c003_0001.jpg"),
    ("folders", _touch("gallery/notes.txt"),
     "{root}/gallery/notes.txt: expected only folders named by vehicle id in gallery/"),
    ("folders", _touch("labels.csv", b"path,vehicle_id,camera_id,split\n"),
     "{root} holds both labels.csv and split folders (train, query, gallery/): expected "
     "one layout"),
    ("csv", _replace_header("split,path,camera_id,vehicle_id,colour"),
     "{root}/labels.csv:1: unknown column 'colour': expected the columns path, "
     "vehicle_id, camera_id, split"),
    ("csv", _replace_header("split,path,vehicle_id"),
     "{root}/labels.csv:1: the header has column 'camera_id' 0 times"),
    ("csv", _append("train,images/001.jpg,3,x12"),
     "{root}/labels.csv:14: vehicle_id 'x12': expected a non-negative integer"),
    ("csv", _append("train,images/001.jpg,cam3,12"),
     "{root}/labels.csv:14: camera_id 'cam3': expected a non-negative integer"),
    ("csv", _append("test,images/001.jpg,3,12"),
     "{root}/labels.csv:14: split 'test': expected one of train, query, gallery"),
    ("csv", _append("train,images/001.jpg,3"),
     "{root}/labels.csv:14: 3 fields, expected 4"),
    ("csv", _append("query,images/001.jpg,3,12"),
     "{root}/labels.csv:14: images/001.jpg is listed again (first at {root}/labels.csv:3)"),
    ("csv", _drop_split("gallery"),
     "{root}/labels.csv: no gallery rows: expected images of each split train, query, "
     "gallery"),
]


@pytest.mark.parametrize("layout,mutate,text", BAD_LAYOUTS)
def test_bad_layout_is_named_in_one_line(tmp_path, layout, mutate, text):
  message = _layout_error(tmp_path, mutate, csv=layout == "csv")
  assert text.format(root=tmp_path / "mine") in message


def test_no_countable_query_is_an_error(tmp_path):
  items = {**ITEMS, "query": [(102, 2), (103, 3)]}
  write_folders(tmp_path / "mine", items)
  with pytest.raises(reid_base.ManualDataError,
                     match=r"^No query image can be counted: 1 of 2 query images .*"
                           r"Put gallery images of the query vehicles from other cameras"):
    build(tmp_path / "mine", tmp_path / "tfds", "mine")
  # Without junk removal query 102 counts.
  assert build(tmp_path / "mine", tmp_path / "tfds", "mine", keep_junk=True).findings


def test_unreadable_image_is_skipped_or_named_with_its_csv_line(tmp_path, capsys):
  root = tmp_path / "csv"
  write_csv(root)
  (root / "images" / "002.jpg").write_bytes(b"not an image")  # line 4 (train)
  report = build(root, tmp_path / "tfds", "skipping")
  assert report.skipped == ["images/002.jpg"]
  assert report.num_examples["train"] == 4
  with flagsaver.flagsaver(data_dir=str(tmp_path / "tfds2"), manual_dir=str(root),
                           name="strict", strict=True):
    assert build_dataset.main(["build_dataset", "folder"]) == 1
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err.startswith(f"error: {root}/labels.csv:4: Unreadable image images/002.jpg (")


def test_command_line(tmp_path, capsys):
  write_folders(tmp_path / "mine")
  data_dir = tmp_path / "tfds"

  def run(*args, **flags):
    with flagsaver.flagsaver(data_dir=str(data_dir), manual_dir=str(tmp_path / "mine"),
                             **flags):
      return build_dataset.main(["build_dataset", *args])

  assert run("folder", name="my_city") == 0
  out = capsys.readouterr().out
  assert (f"Built my_city in {data_dir}/folder/my_city/1.0.0 (gallery: 4, query: 3, "
          "train: 5).") in out
  assert "note: 1 of 3 query images (1 vehicles, e.g. 103) have no gallery" in out
  assert (f"Train or evaluate on it with --config.dataset.name=my_city "
          f"--config.dataset.data_dir={data_dir}") in out
  with pytest.raises(SystemExit) as e:
    run("folder")
  assert e.value.code == 2
  assert "folder needs --name" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    run("veri776", name="x")
  assert "--name is only for folder" in capsys.readouterr().err
  assert run("folder", name="veri776") == 1
  assert "Dataset name 'veri776' is taken by the dataset table" in capsys.readouterr().err
  # Training on a name that is not built says which are.
  with pytest.raises(datasets.DatasetNotBuiltError,
                     match=r"Dataset other is not built in .*; build it with: python -m "
                           r"musp_jax.build_dataset folder --manual_dir DIR --name other "
                           r".* built there: my_city"):
    datasets.entry("other").ensure_built(str(data_dir))
