"""python -m musp_jax.evaluate on saved features, against the numpy reference."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from musp_jax import evaluate
from musp_jax.retrieval import reference
from musp_jax.retrieval import protocols
from musp_jax.retrieval import saved_features
from musp_jax.core import features

ROOT = pathlib.Path(__file__).parents[1]


def _features(rng, n, num_ids=6, p=3, c=8, signature=""):
  feats = features.l2_normalize(rng.normal(size=(n, p, c)).astype(np.float32))
  return saved_features.Features(feats, rng.uniform(0.1, 1, (n, p)).astype(np.float32),
                            rng.integers(0, num_ids, n), rng.integers(0, 3, n),
                            model_signature=signature)


def _reference_row(q, g, remove_junk=True):
  """cam_squared written out in float64, ranked by reference.rank_metrics."""
  w = q.areas[:, None].astype(np.float64) * g.areas[None]
  d = np.sum((q.feats[:, None].astype(np.float64) - g.feats[None]) ** 2, -1)
  r = reference.rank_metrics(np.sum(w * d, -1) / w.sum(-1), q.ids, g.ids, q.cams, g.cams,
                           remove_junk=remove_junk)
  return {"mAP": r["mAP"], "CMC@1": r["cmc"][0], "CMC@5": r["cmc"][4],
          "CMC@10": r["cmc"][9], "mINP": r["mINP"], "num_queries": r["num_valid_queries"]}


def _assert_row(got, want):
  # The float32 device distance and the float64 reference rank random features the
  # same (no near-ties), and both compute the metrics in float64 from integer ranks:
  # equal up to float64 sums in another order.
  assert set(want) <= set(got)
  for k, v in want.items():
    assert got[k] == pytest.approx(v, rel=1e-12), k


@pytest.fixture
def saved(tmp_path):
  rng = np.random.default_rng(0)
  q, g = _features(rng, 15, signature='{"m": 1}'), _features(rng, 40, signature='{"m": 1}')
  saved_features.save_features(tmp_path / "q.npz", q)
  saved_features.save_features(tmp_path / "g.npz", g)
  return tmp_path, q, g


def test_command_line_end_to_end(saved):
  tmp_path, q, g = saved
  env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT),
         "HOME": str(tmp_path)}
  proc = subprocess.run(
      [sys.executable, "-m", "musp_jax.evaluate", "--query", str(tmp_path / "q.npz"),
       "--gallery", str(tmp_path / "g.npz"), "--protocol", "veri776",
       "--json", str(tmp_path / "out.json")],
      capture_output=True, text=True, env=env, cwd=str(tmp_path), check=False)
  assert proc.returncode == 0, proc.stderr
  want = _reference_row(q, g)
  assert "| test set | mAP | CMC@1 | CMC@5 | CMC@10 | mINP | queries |" in proc.stdout
  assert f"| veri776 | {100 * want['mAP']:.2f} | {100 * want['CMC@1']:.2f} |" in proc.stdout
  report = json.loads((tmp_path / "out.json").read_text())
  assert report["protocol"] == "veri776" and report["distance"] == "cam_squared"
  _assert_row(report["results"]["veri776"], want)


def test_plain_files_without_protocol(tmp_path, capsys):
  rng = np.random.default_rng(1)
  q, g = _features(rng, 12, p=1), _features(rng, 30, p=1)
  for name, f in (("q", q), ("g", g)):  # (N, D) features, no areas
    np.savez(tmp_path / f"{name}.npz", feats=f.feats[:, 0], pids=f.ids, camids=f.cams)
  for keep_junk in (False, True):
    args = ["--query", str(tmp_path / "q.npz"), "--gallery", str(tmp_path / "g.npz"),
            "--distance", "euclidean", "--json", "-"] + ["--keep_junk"] * keep_junk
    assert evaluate.main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["remove_junk"] == (not keep_junk)
    _assert_row(report["results"]["q vs g"],
                _reference_row(q, g, remove_junk=not keep_junk))


def test_vehicle_id_takes_one_test_file(tmp_path, capsys):
  rng = np.random.default_rng(2)
  test = _features(rng, 40, num_ids=10)
  test = saved_features.Features(test.feats, test.areas, test.ids, np.full(40, -1))
  saved_features.save_features(tmp_path / "t.npz", test)
  assert evaluate.main(["--test", str(tmp_path / "t.npz"), "--protocol", "vehicle_id",
                        "--size", "small", "--trials", "2"]) == 0
  out = capsys.readouterr().out
  assert "| vehicle_id_small/random2 |" in out and "| vehicle_id_small/first |" in out
  report = evaluate.evaluate_files(test=str(tmp_path / "t.npz"), protocol="vehicle_id",
                             size="small", trials=2)
  q, g = protocols.vehicleid_first_split(test.ids)
  _assert_row(report["results"]["vehicle_id_small/first"],
              _reference_row(test.take(q), test.take(g), remove_junk=False))


def test_rerank_is_recorded_and_changes_the_ranking(saved, capsys):
  tmp_path, q, g = saved
  args = ["--query", str(tmp_path / "q.npz"), "--gallery", str(tmp_path / "g.npz"),
          "--json", "-", "--rerank", "--rerank_k1", "5", "--rerank_k2", "2"]
  assert evaluate.main(args) == 0
  report = json.loads(capsys.readouterr().out)
  assert report["rerank"] is True
  row = report["results"]["q vs g"]
  # Re-ranking moves mAP by far more than 1e-3 on these features (and float64 metrics
  # of the same ranking would agree to 1e-12).
  assert row["mAP"] != pytest.approx(_reference_row(q, g)["mAP"], rel=1e-3)


def test_bad_files_fail_naming_file_and_key(saved, capsys):
  tmp_path, q, _ = saved
  (tmp_path / "out.json").write_text("earlier results\n")
  np.savez(tmp_path / "bad.npz", feats=q.feats, pids=q.ids.astype(np.float32),
           camids=q.cams)
  text = tmp_path / "feats.csv"
  text.write_text("1,2,3\n")
  cases = [
      (tmp_path / "bad.npz", "key 'pids' has dtype float32; expected integer ids"),
      (text, "not a readable .npz archive"),
      (tmp_path / "absent.npz", "no such file"),
  ]
  for path, message in cases:
    rc = evaluate.main(["--query", str(path), "--gallery", str(tmp_path / "g.npz"),
                        "--json", str(tmp_path / "out.json")])
    err = capsys.readouterr().err
    assert rc == 1
    assert f"error: {path}: {message}" in err
    assert "pickle" not in err
  assert (tmp_path / "out.json").read_text() == "earlier results\n"  # not overwritten


def test_refusals(saved, capsys):
  tmp_path, q, _ = saved
  other = saved_features.Features(q.feats, q.areas, q.ids, q.cams, model_signature='{"m": 2}')
  saved_features.save_features(tmp_path / "other.npz", other)
  rc = evaluate.main(["--query", str(tmp_path / "other.npz"),
                      "--gallery", str(tmp_path / "g.npz")])
  assert rc == 1 and "made by another model" in capsys.readouterr().err
  no_cams = saved_features.Features(q.feats, q.areas, q.ids, np.full(len(q), -1))
  saved_features.save_features(tmp_path / "nc.npz", no_cams)
  rc = evaluate.main(["--query", str(tmp_path / "nc.npz"), "--gallery", str(tmp_path / "nc.npz")])
  assert rc == 1 and "pass --keep_junk" in capsys.readouterr().err
  for args in (["--test", "t.npz"],
               ["--protocol", "vehicle_id", "--query", "q.npz", "--gallery", "g.npz"],
               ["--query", "q.npz", "--gallery", "g.npz", "--protocol", "veri776",
                "--keep_junk"],
               ["--query", "q.npz", "--gallery", "g.npz", "--size", "small"]):
    with pytest.raises(SystemExit) as e:
      evaluate.main(args)
    assert e.value.code == 2
  capsys.readouterr()
  assert not os.path.exists(tmp_path / "q.npz.tmp")
