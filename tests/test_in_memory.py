"""musp_jax/training/in_memory.py: the in-memory driver on the synthetic set rendered in
the process gives what the TFDS / grain path gives (the same records, the same batches,
the same evaluation rows)."""

import numpy as np
import pytest

import tools_fixtures
from musp_jax.data import datasets
from musp_jax.data import input_pipeline
from musp_jax.models import build_model
from musp_jax.runtime import process
from musp_jax.training import evaluator
from musp_jax.training import in_memory
from tfds_builders.synthetic_vehicles import render
from tfds_builders.synthetic_vehicles import scenes

NAME = "synthetic_vehicles"


@pytest.fixture(scope="module")
def built():
  """The tiny set built by the TFDS builder, and rendered in memory."""
  data_dir = tools_fixtures.shared_data_dir()
  sources = {split: datasets.load_split(NAME, split, data_dir=data_dir, builder_config="tiny")
             for split in ("train", "query", "gallery")}
  rendered = scenes.render_set("tiny", workers=2)  # the parallel render keeps the order
  return data_dir, sources, {split: in_memory.MemorySplit.from_records(records)
                             for split, records in rendered.items()}


def test_in_memory_splits_are_the_built_records(built):
  data_dir, sources, splits = built
  for split, source in sources.items():
    records = list(source)
    assert [r["image"] for r in records] == list(splits[split].images)
    assert [r["part_mask"] for r in records] == list(splits[split].part_masks)
    np.testing.assert_array_equal([r["vehicle_id"] for r in records],
                                  splits[split].vehicle_ids)
    np.testing.assert_array_equal([r["camera_id"] for r in records],
                                  splits[split].camera_ids)
  index = datasets.split_index(NAME, "train", data_dir=data_dir, builder_config="tiny")
  labels, label_ids = splits["train"].labels()
  np.testing.assert_array_equal(labels, index["label"])
  assert [label_ids[v] for v in labels] == list(index["vehicle_id"])


def test_batches_are_the_grain_pipelines(built):
  _, sources, splits = built
  config = tools_fixtures.tiny_config()
  config.input.num_workers = 0
  config.input.num_ids, config.input.num_instances = 4, 2
  labels, _ = splits["train"].labels()
  grain_batches = input_pipeline.train_batches(
      sources["train"], labels, config.input, seed=3, start_step=5, global_batch_size=8)
  ours = in_memory.train_batches(splits["train"], labels, config.input, seed=3,
                                start_step=5, stop_step=7, threads=2)
  for theirs, mine in zip(grain_batches, ours):
    assert theirs.keys() == mine.keys()
    for k in theirs:
      np.testing.assert_array_equal(theirs[k], mine[k])
  grain_batches.close()


def test_evaluation_rows_are_the_evaluators(built):
  data_dir, _, splits = built
  config = tools_fixtures.tiny_config()
  config.dataset.data_dir = data_dir
  config.input.num_workers = 0
  config.eval.batch_size = 32
  model = build_model(config.model, 16)
  state = tools_fixtures.random_state(config, 16, seed=5)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  mesh = process.make_mesh()
  want = evaluator.evaluate_model(model, variables, config, mesh)
  got, maps = in_memory.evaluate(model, variables, config, splits, mesh=mesh,
                                 classes=render.PART_CLASSES)
  assert got.keys() == want.keys()
  for name, row in want.items():
    for k, v in row.items():
      if k != "prototypes":
        assert got[name][k] == pytest.approx(v, rel=1e-6, abs=1e-9), (name, k)
  assert maps["query"].shape == (len(splits["query"]), 4, 4, 3)  # 64 px / 16, n = 3
