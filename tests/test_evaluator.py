"""The evaluator: sharded, padded feature extraction and the results files."""

import json

import jax
import ml_collections
import pytest

import tools_fixtures
from musp_jax.data import augment
from musp_jax.data import datasets
from musp_jax.training import evaluator
from musp_jax.core import features
from musp_jax.runtime import process

ROWS = {"veri776": {"mAP": 0.5, "CMC@1": 0.75, "CMC@5": 0.875, "CMC@10": 1.0,
                    "mINP": 0.125, "num_queries": 3}}


@pytest.mark.numerics
def test_extract_features_matches_one_image_at_a_time():
  """22 query images in global batches of 8 over 8 devices: the last batch is padded."""
  loaded = tools_fixtures.shared_model()
  config = ml_collections.ConfigDict(loaded.config.to_dict())  # the shared one stays
  config.dataset.data_dir = tools_fixtures.shared_data_dir()
  source = datasets.load_split("synthetic_vehicles", "query",
                               data_dir=config.dataset.data_dir, builder_config="tiny")
  assert len(source) % config.eval.batch_size and jax.device_count() == 8
  got = evaluator.extract_features(loaded.model, loaded.variables, source, config,
                                   process.make_mesh())
  transform = augment.TestTransform.from_config(config.input)
  for i in range(len(source)):
    x = transform(source[i]["image"])[None]
    feats, areas = features.embed(loaded.variables, x, model=loaded.model, flip=False,
                                  normalize=config.input.normalize)
    # Batched (8 devices) and single-image programs: tools_fixtures.NET_OUTPUT_RTOL.
    # Measured: features 1.5e-5 (AVX2) and 1.7e-5 (AVX), areas 9.7e-7 on both; a
    # bfloat16 round trip of the features gives 1.8e-3.
    tools_fixtures.assert_net_outputs_close(got["feats"][i], feats[0])
    tools_fixtures.assert_net_outputs_close(got["areas"][i], areas[0])



def test_results_files_round_trip(tmp_path):
  results = {"step": 40, "epoch": 2.5, "results": ROWS}
  evaluator.write_results(tmp_path, results)
  assert evaluator.read_results(tmp_path) == results
  assert json.loads((tmp_path / "results.json").read_text()) == results
  assert (tmp_path / "results.md").read_text() == (
      "Results at step 40 (epoch 2.5)\n\n"
      "| test set | mAP | CMC@1 | CMC@5 | CMC@10 | mINP | queries |\n"
      "|---|---|---|---|---|---|---|\n"
      "| veri776 | 50.00 | 75.00 | 87.50 | 100.00 | 12.50 | 3 |\n")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.md"]
  assert evaluator.read_results(tmp_path, "eval_step_3") == {}


def test_scalars_and_the_checkpoint_metric():
  rows = {**ROWS, "other/first": {"mAP": 0.9}, "other/second": {"mAP": 0.2}}
  # The mean over the datasets of each one's first row: (0.5 + 0.9) / 2.
  assert evaluator.primary_map(rows) == pytest.approx(0.7)
  assert evaluator.primary_map(ROWS) == 0.5
  assert evaluator.dataset_blocks(rows) == {"veri776": ["veri776"],
                                            "other": ["other/first", "other/second"]}
  assert evaluator.tensorboard_scalars(rows) == {
      "eval/veri776/mAP": 0.5, "eval/veri776/CMC@1": 0.75, "eval/veri776/CMC@5": 0.875,
      "eval/veri776/CMC@10": 1.0, "eval/veri776/mINP": 0.125, "eval/other/first/mAP": 0.9,
      "eval/other/second/mAP": 0.2}
  # Several datasets: a table each, under its name.
  table = evaluator.markdown_table({"step": 3, "results": rows})
  assert table.startswith("Results at step 3\n\nveri776:\n\n| test set |")
  assert "\n\nother:\n\n| test set |" in table
  assert "| other/second | 20.00 | - |" in table
