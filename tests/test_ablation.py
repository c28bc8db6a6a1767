"""scripts/ablation.py: statistics over seeds, tables, configs, and a tiny run end to end."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

import tools_fixtures

ROOT = pathlib.Path(__file__).resolve().parents[1]


ablation = tools_fixtures.load_script("ablation")


def _record(variant, seed, m, c1, bg=None):
  att = {k: None for k in ablation.ATTENTION}
  if variant != "baseline":
    att.update(parts_on_vehicle=0.5, background_on_background=bg, background_taken=0.1,
               image_dependence=0.2, part_iou=0.3)
  return {"variant": variant, "seed": seed, "mAP": m, "CMC@1": c1, "CMC@5": c1, **att}


def test_mean_and_sample_std_over_seeds():
  records = [_record("baseline", 0, 0.2, 0.5), _record("baseline", 1, 0.4, 0.7),
             _record("baseline", 2, 0.6, 0.9),
             _record("MUSP n=2", 0, 0.3, 0.6, bg=0.8), _record("MUSP n=2", 1, 0.5, 0.6)]
  stats = ablation.aggregate(records)
  assert list(stats) == ["baseline", "MUSP n=2"]
  base = stats["baseline"]["mAP"]
  # numpy float64 statistics of three numbers: approx's default rel=1e-6 is far above
  # their rounding (1e-16); no XLA code enters.
  assert base["mean"] == pytest.approx(0.4) and base["n"] == 3
  assert base["std"] == pytest.approx(0.2)  # sqrt(((-.2)^2 + 0 + .2^2) / (3 - 1))
  assert stats["baseline"]["part_iou"] is None  # no attention maps
  musp = stats["MUSP n=2"]
  # sqrt(0.02) = 0.141421...: the literal has 4 decimals, hence abs=1e-4.
  assert musp["CMC@1"]["std"] == 0.0 and musp["mAP"]["std"] == pytest.approx(0.1414, abs=1e-4)
  # A dead background map (None) is left out, and the count says so.
  assert musp["background_on_background"] == {"mean": 0.8, "std": 0.0, "n": 1}
  text = ablation.tables(stats)
  assert "| 2 | 40.0 +- 14.1 | 60.0 +- 0.0 | 60.0 +- 0.0 |" in text
  assert "| baseline (no attention) | 40.0 +- 20.0 | 70.0 +- 20.0 | 70.0 +- 20.0 |" in text
  assert "| MUSP n=2 | 50.0 +- 0.0 | 80.0 +- 0.0 (1/2) | 10.0 +- 0.0 |" in text


def test_run_configs_change_only_what_the_variant_says():
  base = ablation.run_config("MUSP n=5", 0, scale=1.0)
  half = ablation.run_config("MUSP n=5 ESE off", 2, scale=0.5,
                             overrides=[("input.image_size", (32, 32))])
  assert half.model.ese == "none" and base.model.ese != "none" and half.seed == 2
  assert half.optim.num_epochs == round(base.optim.num_epochs / 2)
  assert half.eval.every_epochs == half.optim.num_epochs  # one evaluation, at the end
  assert half.optim.warmup_epochs == max(1, round(base.optim.warmup_epochs / 2))
  assert all(m < half.optim.num_epochs for m in half.optim.milestones)
  assert tuple(half.input.image_size) == (32, 32)
  assert ablation.run_config("baseline", 0, scale=1.0).model.head == "baseline"
  with pytest.raises(ValueError, match="model.nmu"):
    ablation.run_config("baseline", 0, scale=1.0, overrides=[("model.nmu", 3)])
  assert ablation.parse_set("optim.lr=3e-3") == ("optim.lr", 3e-3)
  assert ablation.parse_set("dataset.builder_config=tiny") == ("dataset.builder_config",
                                                               "tiny")


def test_tiny_ablation_end_to_end(tmp_path):
  """Two seeds of one variant at one epoch of the tiny set: the script's whole path
  (the baseline's rows are covered by the tables test above)."""
  data_dir = tools_fixtures.shared_data_dir()
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": ""}
  cmd = [sys.executable, str(ROOT / "scripts" / "ablation.py"), "--workdir", str(tmp_path),
         "--variants", "MUSP n=2", "--seeds", "2", "--scale", "0.01",
         "--set", "dataset.builder_config=tiny", "--set", f"dataset.data_dir={data_dir}",
         "--set", "input.image_size=(32,32)", "--set", "input.num_workers=0",
         "--set", "eval.batch_size=48",
         "--set", f"compilation_cache_dir={tmp_path / 'xla'}"]
  out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  saved = json.loads((tmp_path / "ablation.json").read_text())
  assert [(r["variant"], r["seed"]) for r in saved["runs"]] == [("MUSP n=2", 0),
                                                                 ("MUSP n=2", 1)]
  for r in saved["runs"]:  # what each run's own results say
    rows = json.loads((tmp_path / r["variant"].replace(" ", "").replace("=", "")
                       / f"seed{r['seed']}" / "results.json").read_text())["results"]
    assert r["mAP"] == next(iter(rows.values()))["mAP"]
    assert 0.0 <= r["part_iou"] <= 1.0
  assert saved["stats"]["MUSP n=2"]["mAP"]["n"] == 2
  table = (tmp_path / "ablation.md").read_text()
  assert "| 2 | " in table and "| MUSP n=2 | " in table
  assert (tmp_path / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "2 runs (scale 0.01)" in out.stdout
