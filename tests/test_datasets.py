"""data/datasets.py: reading built splits, the split index, errors, atomic builds."""

import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest

from configs import synthetic
from configs import veriwild
from musp_jax.data import datasets
from tfds_builders.synthetic_vehicles import render

NAME = "synthetic_vehicles"
VERSION = str(datasets.builder_class(NAME).VERSION)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tfds"))
  datasets.ensure_built(NAME, data_dir=d, builder_config="tiny")
  return d


def test_records_have_the_documented_types(data_dir):
  src = datasets.load_split(NAME, "train", data_dir=data_dir, builder_config="tiny")
  rec = src[0]
  assert rec["image"][:2] == b"\xff\xd8"  # JPEG bytes, not decoded
  assert rec["part_mask"][:8] == b"\x89PNG\r\n\x1a\n"  # the label map: PNG bytes
  assert isinstance(rec["image"], bytes) and isinstance(rec["file_name"], str)
  for k in ("label", "vehicle_id", "camera_id"):
    assert type(rec[k]) is int
  assert src[-1] == src[len(src) - 1]
  with pytest.raises(IndexError):
    src[len(src)]
  assert [r["file_name"] for r in src.__getitems__([2, 0])] == [src[2]["file_name"],
                                                                src[0]["file_name"]]


def test_split_index_matches_records(data_dir):
  for split in ("train", "query", "gallery"):
    src = datasets.load_split(NAME, split, data_dir=data_dir, builder_config="tiny")
    index = datasets.split_index(NAME, split, data_dir=data_dir, builder_config="tiny")
    for k in ("label", "vehicle_id", "camera_id"):
      assert index[k].dtype == np.int64
      np.testing.assert_array_equal(index[k], [r[k] for r in src])
  labels = datasets.split_index(NAME, "train", data_dir=data_dir, builder_config="tiny")["label"]
  assert datasets.num_classes(NAME, data_dir=data_dir, builder_config="tiny") == labels.max() + 1


def test_split_index_rejects_a_stale_index(data_dir, tmp_path):
  copy = tmp_path / "copy"
  shutil.copytree(data_dir, copy)
  meta = copy / NAME / "tiny" / VERSION / "metadata.json"
  content = json.loads(meta.read_text())
  content["index"]["query"]["vehicle_id"][0] += 1000
  meta.write_text(json.dumps(content))
  with pytest.raises(ValueError, match=r"split index query/vehicle_id\[0\].*rebuild"):
    datasets.split_index(NAME, "query", data_dir=str(copy), builder_config="tiny")


def test_a_build_of_an_older_version_is_not_reused(tmp_path):
  old = tmp_path / NAME / "tiny" / "1.0.0"
  old.mkdir(parents=True)
  (old / "dataset_info.json").write_text("{}")
  assert VERSION != "1.0.0"
  assert not datasets.is_built(NAME, data_dir=str(tmp_path), builder_config="tiny")


def test_source_pickles_for_workers(data_dir):
  src = datasets.load_split(NAME, "query", data_dir=data_dir, builder_config="tiny")
  again = pickle.loads(pickle.dumps(src))
  assert len(again) == len(src) and again[3] == src[3]


def test_not_built_names_the_build_command(tmp_path):
  with pytest.raises(datasets.DatasetNotBuiltError) as e:
    datasets.load_split("veri_wild", "train", data_dir=str(tmp_path), builder_config="")
  assert (f"python -m musp_jax.build_dataset veri_wild --manual_dir DIR --data_dir {tmp_path}"
          " (DIR") in str(e.value)
  with pytest.raises(datasets.DatasetNotBuiltError,
                     match=f"build_dataset veri776 --manual_dir DIR --data_dir {tmp_path} \\(DIR"):
    datasets.ensure_built("veri776", data_dir=str(tmp_path), builder_config="")
  with pytest.raises(datasets.DatasetNotBuiltError,
                     match=f"build_dataset vehicle_id --manual_dir /data/VID --data_dir {tmp_path}$"):
    datasets.ensure_built("vehicle_id", data_dir=str(tmp_path), builder_config="",
                          manual_dir="/data/VID")
  with pytest.raises(datasets.DatasetNotBuiltError,
                     match=f"build_dataset synthetic_vehicles --data_dir {tmp_path} --config"):
    datasets.num_classes(NAME, data_dir=str(tmp_path), builder_config="small")


def test_bad_names_are_rejected(data_dir):
  with pytest.raises(ValueError, match=r"has splits \['gallery', 'query', 'train'\], not 'test'"):
    datasets.load_split(NAME, "test", data_dir=data_dir, builder_config="tiny")
  with pytest.raises(ValueError, match="has no builder configs"):
    datasets.load_split("vehicle_id", "train", data_dir=data_dir, builder_config="small")
  with pytest.raises(ValueError, match=r"needs builder_config in \['tiny', 'small', 'large', "
                     r"'parts', 'parts_loose', 'pretrain'\]"):
    datasets.load_split(NAME, "train", data_dir=data_dir, builder_config="huge")
  with pytest.raises(ValueError, match="has no builder configs"):
    datasets.load_split("veri776", "train", data_dir=data_dir, builder_config="small")
  with pytest.raises(ValueError, match="Unknown dataset 'veri'"):
    datasets.load_split("veri", "train", data_dir=data_dir, builder_config="")


def test_eval_sets_follow_the_dataset_table():
  c = synthetic.get_config("runlocal")
  (target,) = datasets.eval_sets(c)
  assert (target.entry, target.splits, target.row_name, target.protocol) == (
      datasets.Entry(NAME, NAME, "tiny"), {"query": "query", "gallery": "gallery"}, NAME,
      "query_gallery")
  c = veriwild.get_config("medium")
  (target,) = datasets.eval_sets(c)
  assert target.splits == {"query": "query_5000", "gallery": "gallery_5000"}
  assert (target.row_name, target.entry.builder_config) == ("veri_wild_medium", "")
  c.eval.dataset, c.eval.test_size = "vehicle_id", "large"  # cross-domain
  (target,) = datasets.eval_sets(c)
  assert (target.splits, target.row_name) == ({"test": "test_2400"}, "vehicle_id_large")
  c.eval.dataset = "synthetic_vehicles"  # another build than the training one: the default
  assert datasets.eval_sets(c)[0].entry.builder_config == "small"
  # Several, in the order listed; the training build of a training dataset.
  c.dataset.name, c.dataset.builder_config = "veri_wild,synthetic_vehicles", "tiny"
  c.eval.dataset = "synthetic_vehicles, veri_wild"
  assert [(t.row_name, t.entry.builder_config) for t in datasets.eval_sets(c)] == [
      (NAME, "tiny"), ("veri_wild_large", "")]
  c.eval.dataset = ""  # the training datasets, as dataset.name lists them
  assert [t.name for t in datasets.eval_sets(c)] == ["veri_wild", NAME]
  c.eval.dataset, c.eval.test_size = "veri_wild", "huge"
  with pytest.raises(ValueError, match=r"eval.test_size='huge'; veri_wild has test sizes "
                     r"\['small', 'medium', 'large'\]"):
    datasets.eval_sets(c)


def test_entries_name_table_rows_and_users_datasets():
  assert datasets.split_names(" veri776, vehicle_id ") == ["veri776", "vehicle_id"]
  assert datasets.split_names("") == []
  assert datasets.entry("veri776", "tiny") == datasets.Entry("veri776", "veri776", "")
  assert datasets.entry(NAME) == datasets.Entry(NAME, NAME, "small")  # the default build
  assert datasets.entry("my_city") == datasets.Entry("my_city", "folder", "my_city")
  c = synthetic.get_config("runlocal")
  c.dataset.name = "veri776,my_city,synthetic_vehicles"
  assert [e.name for e in datasets.training_entries(c)] == [
      "my_city", NAME, "veri776"]  # label order: by name
  for bad in ("My City", "veri776", "folder"):
    with pytest.raises(ValueError, match="Dataset name"):
      datasets.check_user_dataset_name(bad)


def test_ensure_built_is_idempotent(data_dir):
  info = os.path.join(data_dir, NAME, "tiny", VERSION, "dataset_info.json")
  before = os.stat(info).st_mtime_ns
  datasets.ensure_built(NAME, data_dir=data_dir, builder_config="tiny")
  assert os.stat(info).st_mtime_ns == before


def test_failed_build_leaves_nothing_complete(tmp_path, monkeypatch):
  calls = {"n": 0}
  real_render = render.render

  def failing_render(*args, **kwargs):
    calls["n"] += 1
    if calls["n"] > 150:  # train is done (128 images), query is half written
      raise RuntimeError("renderer crashed")
    return real_render(*args, **kwargs)

  monkeypatch.setattr(render, "render", failing_render)
  with pytest.raises(RuntimeError, match="renderer crashed"):
    datasets.build(NAME, data_dir=str(tmp_path), builder_config="tiny")
  assert calls["n"] > 150
  assert not datasets.is_built(NAME, data_dir=str(tmp_path), builder_config="tiny")
  assert not datasets.get_builder(NAME, data_dir=str(tmp_path),
                                  builder_config="tiny").is_prepared()
  assert not (tmp_path / NAME / "tiny" / VERSION).exists()
  with pytest.raises(datasets.DatasetNotBuiltError):
    datasets.load_split(NAME, "train", data_dir=str(tmp_path), builder_config="tiny")
  monkeypatch.setattr(render, "render", real_render)
  report = datasets.build(NAME, data_dir=str(tmp_path), builder_config="tiny")
  assert report.num_examples["train"] == 128
  assert len(datasets.load_split(NAME, "gallery", data_dir=str(tmp_path),
                                 builder_config="tiny")) == report.num_examples["gallery"]


def test_reading_needs_no_tensorflow(data_dir):
  code = (
      "import sys\n"
      "from musp_jax.data import datasets\n"
      f"s = datasets.load_split({NAME!r}, 'train', data_dir={data_dir!r}, builder_config='tiny')\n"
      "s[0]\n"
      f"datasets.split_index({NAME!r}, 'gallery', data_dir={data_dir!r}, builder_config='tiny')\n"
      "assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'\n")
  subprocess.run([sys.executable, "-c", code], check=True)


def test_part_classes_come_from_the_builder():
  from tfds_builders.synthetic_vehicles import render
  assert datasets.part_classes("synthetic_vehicles") == render.PART_CLASSES
  assert datasets.part_classes("synthetic_vehicles")[0] == "background"
  assert datasets.part_classes("veri776") == ()
