"""compat.evaluate_rank / evaluate_features against fast-reid's eval_market1501."""

import numpy as np
import pytest
import torch

from musp_jax import compat


def _eval_market1501(distmat, q_pids, g_pids, q_camids, g_camids, max_rank):
  """fast-reid's eval_market1501 (its Python path), restated as a plain loop.

  Returns (cmc float32 array, [AP], [INP]) with fast-reid's types. As there, AP and
  INP are float64: ratios of integer counts, summed over the kept gallery in rank order.
  """
  num_q, num_g = distmat.shape
  max_rank = min(max_rank, num_g)
  order_QxG = np.argsort(distmat, axis=1)
  cmcs, aps, inps = [], [], []
  for q in range(num_q):
    order = order_QxG[q]
    same_id = g_pids[order] == q_pids[q]
    junk = same_id & (g_camids[order] == q_camids[q])
    hits = same_id[~junk].astype(np.int32)
    if not hits.any():
      continue
    cum = hits.cumsum()
    last = np.max(np.where(hits == 1))
    inps.append(cum[last] / (last + 1.0))
    cmcs.append(np.minimum(cum, 1)[:max_rank])
    precision = np.asarray([c / (i + 1.0) for i, c in enumerate(cum)]) * hits
    aps.append(precision.sum() / hits.sum())
  cmc = np.asarray(cmcs).astype(np.float32).sum(0) / float(len(cmcs))
  return cmc, aps, inps


def _problem(seed, num_q=40, num_g=200, num_ids=12, num_cams=3):
  """Tie-free distances: each row is a permutation of distinct values."""
  rng = np.random.default_rng(seed)
  distmat = np.argsort(rng.random((num_q, num_g)), axis=1).astype(np.float32) / num_g
  distmat += rng.random((num_q, 1)).astype(np.float32)  # rows differ in offset too
  # Query ids num_ids and num_ids + 1 are not in the gallery (skipped queries).
  labels = (rng.integers(0, num_ids + 2, num_q), rng.integers(0, num_ids, num_g),
            rng.integers(0, num_cams, num_q), rng.integers(0, num_cams, num_g))
  return distmat, labels


def _assert_same(got, want):
  cmc, all_ap, all_inp = got
  want_cmc, want_ap, want_inp = want
  assert type(cmc) is type(want_cmc) and cmc.dtype == want_cmc.dtype
  assert cmc.shape == want_cmc.shape
  # Both are (queries hit within k) / (valid queries) rounded to float32 once (a
  # float64 quotient of integers below 2^24 is never a float32 rounding midpoint).
  np.testing.assert_array_equal(cmc, want_cmc)
  for values, want_values in ((all_ap, want_ap), (all_inp, want_inp)):
    assert type(values) is type(want_values) is list
    assert len(values) == len(want_values)
    assert [type(v) for v in values] == [type(v) for v in want_values]
    # The same float64 ratios (k + 1) / (r_k + 1), summed in another order: at most
    # one 2^-53 rounding per term, < 3e-13 for 2,000 terms (README promises 1e-9).
    np.testing.assert_allclose(values, want_values, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed, max_rank, num_q, num_g, num_ids", [
    (0, 50, 40, 200, 12), (1, 10, 40, 200, 12),
    pytest.param(7, 50, 200, 2000, 40, marks=pytest.mark.numerics)])
def test_evaluate_rank_equals_fastreid(seed, max_rank, num_q, num_g, num_ids):
  distmat, labels = _problem(seed, num_q, num_g, num_ids)
  want = _eval_market1501(distmat, *labels, max_rank)
  assert len(want[1]) < distmat.shape[0]  # some queries have no true match
  _assert_same(compat.evaluate_rank(distmat, *labels, max_rank), want)
  _assert_same(compat.evaluate_rank(distmat, *labels, max_rank=max_rank, query_block=7),
               want)


def test_max_rank_beyond_the_gallery_is_cut_as_fastreid():
  distmat, (q_ids, g_ids, _, _) = _problem(2, num_q=10, num_g=30, num_ids=4)
  q_cams, g_cams = np.zeros(10, int), np.ones(30, int)  # no junk
  want = _eval_market1501(distmat, q_ids, g_ids, q_cams, g_cams, 50)
  got = compat.evaluate_rank(distmat, q_ids, g_ids, q_cams, g_cams)
  assert got[0].shape == (30,)
  _assert_same(got, want)


def test_torch_tensors_are_read_in_place():
  distmat, labels = _problem(3)
  want = _eval_market1501(distmat, *labels, 20)
  dist_t = torch.from_numpy(distmat).requires_grad_(True)
  labels_t = [torch.from_numpy(x) for x in labels]
  _assert_same(compat.evaluate_rank(dist_t, *labels_t, max_rank=20), want)
  # A CPU tensor is viewed, not copied; bfloat16 is widened (a copy).
  t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
  assert np.shares_memory(compat.as_array(t, "t"), t.numpy())
  np.testing.assert_array_equal(compat.as_array(t.bfloat16(), "t"), t.numpy())


def _fastreid_distances(qx, gx, metric):
  """fast-reid's build_dist: euclidean is the squared distance; cosine 1 - cos."""
  if metric == "cosine":
    qx = qx / np.linalg.norm(qx, axis=1, keepdims=True)
    gx = gx / np.linalg.norm(gx, axis=1, keepdims=True)
    return 1.0 - qx @ gx.T
  return np.sum((qx[:, None].astype(np.float64) - gx[None]) ** 2, axis=-1)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_evaluate_features_equals_fastreid(metric):
  rng = np.random.default_rng(4)
  _, labels = _problem(4, num_q=25, num_g=90)
  qx = rng.normal(size=(25, 16)).astype(np.float32)
  gx = rng.normal(size=(90, 16)).astype(np.float32)
  want = _eval_market1501(_fastreid_distances(qx, gx, metric), *labels, 50)
  got = compat.evaluate_features(torch.from_numpy(qx), gx, *labels, metric=metric)
  _assert_same(got, want)


def test_evaluate_features_cam_distance_with_areas():
  rng = np.random.default_rng(5)
  _, labels = _problem(5, num_q=20, num_g=60)
  qf, gf = rng.normal(size=(20, 3, 8)), rng.normal(size=(60, 3, 8))
  qa, ga = rng.uniform(0.1, 1, (20, 3)), rng.uniform(0.1, 1, (60, 3))
  w = qa[:, None] * ga[None]
  dist = np.sum(w * np.sum((qf[:, None] - gf[None]) ** 2, -1), -1) / w.sum(-1)
  want = _eval_market1501(dist, *labels, 50)
  got = compat.evaluate_features(qf, gf, *labels, q_areas=qa, g_areas=ga,
                                 metric="cam_squared")
  _assert_same(got, want)


def test_errors_name_the_argument():
  distmat, (q_ids, g_ids, q_cams, g_cams) = _problem(6, num_q=5, num_g=8)
  with pytest.raises(ValueError, match=r"g_pids has shape \(7,\); expected \(8,\)"):
    compat.evaluate_rank(distmat, q_ids, g_ids[:7], q_cams, g_cams)
  with pytest.raises(ValueError, match="q_camids has dtype float64; expected integer"):
    compat.evaluate_rank(distmat, q_ids, g_ids, q_cams.astype(float), g_cams)
  with pytest.raises(ValueError, match=r"distmat has shape \(5, 8, 1\)"):
    compat.evaluate_rank(distmat[..., None], q_ids, g_ids, q_cams, g_cams)
  with pytest.raises(ValueError, match="distmat has NaN"):
    compat.evaluate_rank(np.full_like(distmat, np.nan), q_ids, g_ids, q_cams, g_cams)
  with pytest.raises(ValueError, match="use_metric_cuhk03=True"):
    compat.evaluate_rank(distmat, q_ids, g_ids, q_cams, g_cams, 50, True)
  feats = np.zeros((5, 2, 4), np.float32)
  g_feats = np.zeros((8, 2, 4), np.float32)
  args = (q_ids, g_ids, q_cams, g_cams)
  with pytest.raises(ValueError, match=r"pass q_areas \(5, 2\)"):
    compat.evaluate_features(feats, g_feats, *args, metric="cam_squared")
  with pytest.raises(ValueError, match="q_areas is used by the cam distances only"):
    compat.evaluate_features(feats, g_feats, *args, q_areas=np.ones((5, 2)))
  with pytest.raises(ValueError, match=r"g_feats has shape \(8, 2, 4, 1\)"):
    compat.evaluate_features(feats, g_feats[..., None], *args)
  with pytest.raises(ValueError, match="q_feats .* and g_feats .* differ"):
    compat.evaluate_features(feats, g_feats[:, :1], *args)
  with pytest.raises(ValueError, match="metric='jaccard'"):
    compat.evaluate_features(feats, g_feats, *args, metric="jaccard")
