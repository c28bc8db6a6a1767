"""Several training datasets at once, and the user's own: labels, combine_all, and a
training run that evaluates on each dataset and resumes exactly."""

import json
import logging
import shutil

import jax
import numpy as np
import pytest

import test_tfds_folder
import test_tfds_vehicle_id
import test_tfds_veri776
import test_train
from configs import synthetic
from musp_jax.data import datasets
from musp_jax.data import training_set
from musp_jax.runtime import process
from musp_jax.training import checkpointing
from musp_jax.training import evaluator
from musp_jax.training import train


@pytest.fixture(autouse=True)
def one_device(monkeypatch):
  """Runs on one of the session's 8 fake devices: compiling for 8 costs 3x here."""
  monkeypatch.setattr(process, "make_mesh", lambda: jax.make_mesh(
      (1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1]))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """Tiny VeRi-776 and VehicleID builds, and two of the user's own (folders, CSV)."""
  root = tmp_path_factory.mktemp("joint")
  data = root / "tfds"
  test_tfds_veri776.write_veri(root / "VeRi")
  test_tfds_vehicle_id.write_vehicle_id(root / "VehicleID")
  datasets.build("veri776", data_dir=str(data), builder_config="",
                 manual_dir=str(root / "VeRi"))
  datasets.build("vehicle_id", data_dir=str(data), builder_config="",
                 manual_dir=str(root / "VehicleID"))
  test_tfds_folder.write_folders(root / "mine")
  test_tfds_folder.write_csv(root / "csv")
  test_tfds_folder.build(root / "mine", data, "own_folder")
  test_tfds_folder.build(root / "csv", data, "own_csv", keep_junk=True)
  return data


def _config(data_dir, names, **overrides):
  """The tests' run: ResNet-18 baseline at 32 px, P x K = 4 x 2, two epochs, evaluated
  at the end (the head does not matter here, and the baseline's compiles fastest)."""
  config = synthetic.get_config("runlocal,baseline")
  config.dataset.name, config.dataset.builder_config = names, ""
  config.dataset.data_dir = str(data_dir)
  config.input.image_size = (32, 32)
  config.input.num_ids, config.input.num_instances = 4, 2
  config.optim.num_epochs, config.optim.warmup_epochs = 2, 1
  config.optim.milestones = (1,)
  config.eval.every_epochs, config.eval.batch_size = 2, 8
  config.eval.vehicleid_trials = 2
  config.checkpoint_every_steps = config.log_every_steps = 2
  config.compilation_cache_dir = str(data_dir.parent / "xla_cache")
  for key, value in overrides.items():
    section, field = key.split(".")
    config[section][field] = value
  return config


def test_labels_are_disjoint_sorted_and_mapped_to_their_vehicles(data_dir):
  data = training_set.load(_config(data_dir, "veri776,vehicle_id"))
  # Datasets in name order: VehicleID's ids 7, 12, 30, then VeRi-776's 2, 5, 9.
  assert data.names == ("vehicle_id", "veri776")
  assert data.label_identities == (("vehicle_id", 7), ("vehicle_id", 12),
                                   ("vehicle_id", 30), ("veri776", 2), ("veri776", 5),
                                   ("veri776", 9))
  assert data.num_classes == 3 + 3  # each dataset's class count, summed
  assert len(data.source) == len(data.labels) == 4 + 5
  for i in range(len(data.source)):
    record = data.source[i]
    dataset = data.names[data.domains[i]]
    assert data.label_identities[data.labels[i]] == (dataset, record["vehicle_id"])
  assert data.identities() == {"vehicle_id": 3, "veri776": 3}
  # The order the config lists them in does not change the labels.
  other = training_set.load(_config(data_dir, "vehicle_id, veri776"))
  assert other.label_identities == data.label_identities
  np.testing.assert_array_equal(other.labels, data.labels)


def test_combine_all_trains_on_the_largest_test_set_too(data_dir):
  data = training_set.load(_config(data_dir, "veri776,vehicle_id",
                                   **{"dataset.combine_all": True}))
  # VehicleID: + test_2400 (ids 43, 43); VeRi-776: + query and gallery (ids 11, 12).
  assert data.label_identities == (
      ("vehicle_id", 7), ("vehicle_id", 12), ("vehicle_id", 30), ("vehicle_id", 43),
      ("veri776", 2), ("veri776", 5), ("veri776", 9), ("veri776", 11), ("veri776", 12))
  assert len(data.source) == (4 + 2) + (5 + 2 + 4)
  for i in range(len(data.source)):
    assert data.label_identities[data.labels[i]] == (
        data.names[data.domains[i]], data.source[i]["vehicle_id"])


def _final_state(workdir):
  step, state = test_train._final_params(workdir)
  return step, jax.tree.leaves(state)


def test_joint_training_evaluates_each_dataset_and_resumes_exactly(data_dir, tmp_path,
                                                                   caplog):
  """VeRi-776, VehicleID and the folder- and CSV-built datasets of the user's own images
  trained together (dataset-balanced batches: one identity of each per batch) for 6
  steps straight, and as 4 + 2 steps resumed mid-epoch; each dataset evaluated by its protocol."""
  config = _config(data_dir, "veri776,vehicle_id,own_folder,own_csv",
                   **{"input.balance_datasets": True})
  results = train.train_and_evaluate(config, str(tmp_path / "a"))
  # 9 + 5 + 5 images in batches of 8: 3 steps an epoch.
  assert results["step"] == 6
  rows = results["results"]
  # A block of rows per dataset, in the order eval.dataset (here: dataset.name) lists them.
  assert list(rows) == ["veri776", "vehicle_id_small/random2", "vehicle_id_small/first",
                        "own_folder", "own_csv"]
  assert rows["veri776"]["num_queries"] == 2
  assert rows["vehicle_id_small/first"]["num_queries"] == 1  # id 40's second image
  # Own queries 101, 102, 103: 103 has no gallery image; 102 only a same-camera one,
  # junk for the folder build, a match for the CSV build (--keep_junk).
  assert rows["own_folder"]["num_queries"] == 1
  assert rows["own_csv"]["num_queries"] == 2
  assert evaluator.primary_map(rows) == pytest.approx(np.mean(
      [rows[n]["mAP"] for n in ("veri776", "vehicle_id_small/random2", "own_folder",
                                "own_csv")]))
  assert json.loads((tmp_path / "a" / "results.json").read_text())["results"] == rows
  table = (tmp_path / "a" / "results.md").read_text()
  assert "\nveri776:\n" in table and "\nvehicle_id_small:\n" in table
  scalars = test_train._events(tmp_path / "a")
  assert "eval/veri776/mAP" in scalars and "eval/vehicle_id_small/first/mAP" in scalars
  # Labels in dataset-name order, 3 per dataset: the classifier has their sum.
  restored = checkpointing.load_variables(tmp_path / "a")
  assert restored.run.num_classes == 12
  assert restored.run.label_identities == (
      *(("own_csv", v) for v in (3, 8, 20)), *(("own_folder", v) for v in (3, 8, 20)),
      ("vehicle_id", 7), ("vehicle_id", 12), ("vehicle_id", 30),
      ("veri776", 2), ("veri776", 5), ("veri776", 9))
  kernels = [v for path, v in jax.tree_util.tree_leaves_with_path(
      restored.variables["params"]["head"]) if "classifier" in jax.tree_util.keystr(path)]
  assert [k.shape[-1] for k in kernels] == [12]
  # A run stopped after step 4 (mid-epoch) leaves that step's checkpoint; resumed from
  # it, it ends with the same weights and results.
  shutil.copytree(tmp_path / "a" / "checkpoints" / "4", tmp_path / "b" / "checkpoints" / "4")
  with caplog.at_level(logging.INFO):
    again = train.train_and_evaluate(config, str(tmp_path / "b"))
  assert f"Resumed from step 4 in {tmp_path / 'b' / 'checkpoints'}" in caplog.text
  (step_a, a), (step_b, b) = _final_state(tmp_path / "a"), _final_state(tmp_path / "b")
  assert step_a == step_b == 6
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert again["results"] == results["results"]
