"""Verification figures (streamed, histogram + refinement) against a brute-force count."""

import json

import numpy as np
import pytest

from musp_jax import evaluate as evaluate_cli
from musp_jax import search
from musp_jax.retrieval import ranking
from musp_jax.retrieval import saved_features
from musp_jax.core import features
from musp_jax.retrieval import verification


def _brute_force(dist, q_ids, g_ids, q_cams, g_cams, remove_junk, fprs):
  same = q_ids[:, None] == g_ids[None, :]
  junk = same & (q_cams[:, None] == g_cams[None, :]) & remove_junk
  pos, neg = np.sort(dist[same & ~junk]), np.sort(dist[~same])
  out = {}
  for e in fprs:  # FPR 10^-e: accept the k = floor(N / 10^e) smallest negatives
    k = len(neg) // 10**e
    t = neg[k] if k < len(neg) else np.inf
    out[e] = (float(t), np.mean(pos < t), np.mean(neg < t))
  eer, at = 1.0, -np.inf
  for t in np.unique(pos):
    v = max(np.mean(neg <= t), np.mean(pos > t))
    if v < eer:
      eer, at = v, t
  return out, eer, at


@pytest.mark.parametrize("remove_junk", [True, False])
def test_roc_equals_brute_force(remove_junk):
  """Exact on a matrix with many ties (positives equal to negatives included),
  negative distances, and 1,600 negatives (FPR 1e-3 -> k = 1)."""
  rng = np.random.default_rng(0)
  q_ids, g_ids = rng.integers(0, 6, 40), rng.integers(0, 6, 50)
  q_cams, g_cams = rng.integers(0, 2, 40), rng.integers(0, 2, 50)
  same = q_ids[:, None] == g_ids[None, :]
  dist = rng.normal(1.0, 0.3, (40, 50)) - 0.4 * same
  dist = (np.round(dist * 64) / 64).astype(np.float32)  # ties, some below 0
  result = verification.roc(verification.matrix_blocks(dist), q_ids, g_ids, q_cams,
                            g_cams, remove_junk=remove_junk, query_block=16)
  want, eer, at = _brute_force(dist, q_ids, g_ids, q_cams, g_cams, remove_junk,
                               (1, 2, 3, 4))
  assert result["num_negative"] == np.sum(~same)
  for e, (t, tpr, fpr) in want.items():
    key = f"1e-{e:02d}"
    assert result["threshold_at_fpr"][key] == t
    assert result["tpr_at_fpr"][key] == tpr
    assert result["fpr_at_threshold"][key] == fpr <= 10.0**-e
  assert result["eer"] == eer and result["eer_threshold"] == at
  assert result["threshold"] == result["threshold_at_fpr"]["1e-03"]


@pytest.mark.numerics  # exact only if both paths round alike on every instruction set
def test_roc_from_features_and_cli(tmp_path):
  """evaluate --roc: the streamed feature blocks give the brute-force figures of
  retrieval's own distance matrix; the report's threshold drives --max_distance."""
  rng = np.random.default_rng(1)
  centres = rng.standard_normal((8, 2, 6))
  def make(n, name):
    ids = rng.integers(0, 8, n)
    feats = features.l2_normalize((centres[ids] + 0.7 * rng.standard_normal((n, 2, 6)))
                                   .astype(np.float32))
    made = saved_features.Features(feats, rng.uniform(0.2, 1, (n, 2)).astype(np.float32),
                                   ids, rng.integers(0, 3, n),
                                   np.array([f"{name}{i}" for i in range(n)]), "model A")
    saved_features.save_features(tmp_path / f"{name}.npz", made)
    return made
  q, g = make(30, "q"), make(120, "g")
  # The brute force reads the distances the report was computed from: the same jitted
  # block at the same shape (verification.roc's 256 query rows), so the same float32
  # bits, and every figure is compared exactly.
  dist = ranking.distance_matrix(q, g, query_block=256)
  want, eer, _ = _brute_force(dist, q.ids, g.ids, q.cams, g.cams, True, (1, 2, 3))
  report_path, plot_path = tmp_path / "report.json", tmp_path / "roc.png"
  assert evaluate_cli.main(["--query", str(tmp_path / "q.npz"), "--gallery",
                            str(tmp_path / "g.npz"), "--roc", str(plot_path),
                            "--target_fpr", "0.01", "--json", str(report_path)]) == 0
  report = json.loads(report_path.read_text())
  for e, (t, tpr, _) in want.items():
    assert report["roc"]["tpr_at_fpr"][f"1e-{e:02d}"] == tpr
    assert report["roc"]["threshold_at_fpr"][f"1e-{e:02d}"] == t
  assert report["roc"]["eer"] == eer
  assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # search --max_distance REPORT: the target FPR's threshold, for the same model only.
  limit = search.max_distance(str(report_path), at_fpr=None, signature="model A",
                              distance="cam_squared")
  assert limit == report["roc"]["threshold_at_fpr"]["1e-02"]
  results = search.within(search.search(q, g, topk=20), limit)
  kept = [r["distance"] for res in results for r in res["results"]]
  assert kept and max(kept) < limit
  assert sum(map(len, (res["results"] for res in results))) == np.sum(
      np.sort(dist, axis=1)[:, :20] < limit)
  with pytest.raises(ValueError, match="another model"):
    search.max_distance(str(report_path), at_fpr=None, signature="model B",
                        distance="cam_squared")
  with pytest.raises(ValueError, match="distance 'cam_squared'"):
    search.max_distance(str(report_path), at_fpr=None, signature="model A",
                        distance="cam")
