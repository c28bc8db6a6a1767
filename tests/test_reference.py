"""reference.rank_metrics against hand-computed tables and a brute-force loop."""

import numpy as np
import pytest

from musp_jax.retrieval import reference

# Tolerances: rank_metrics is float64 numpy. The hand tables are exact rationals
# (pytest.approx's default rel=1e-6 is far above their float64 rounding); against the
# brute-force loop both sides sum the same ratios of integer ranks, in another order
# (a 2^-53 rounding per term): rel=1e-12.

def _one(dists, g_ids, g_cams, q_id=1, q_cam=0, **kwargs):
  return reference.rank_metrics(np.array([dists], np.float32), np.array([q_id]),
                              np.array(g_ids), np.array([q_cam]),
                              np.array(g_cams), **kwargs)


def test_junk_removed_hand_table():
  # Sorted: 0 neg, 1 pos, 2 junk (id 1, cam 0), 3 neg, 4 pos.
  # Kept: neg, pos (rank 2), neg, pos (rank 4).
  r = _one([0.1, 0.2, 0.3, 0.4, 0.5], [2, 1, 1, 3, 1], [0, 1, 0, 0, 2],
           max_rank=5, per_query=True)
  assert r["mAP"] == pytest.approx((1 / 2 + 2 / 4) / 2)
  np.testing.assert_array_equal(r["cmc"], [0, 1, 1, 1, 1])
  assert r["mINP"] == pytest.approx(2 / 4)
  assert r["num_valid_queries"] == 1
  assert r["per_query"]["AP"] == pytest.approx([(1 / 2 + 2 / 4) / 2])
  assert r["per_query"]["INP"] == pytest.approx([2 / 4])
  np.testing.assert_array_equal(r["per_query"]["first_hit"], [1])


def test_junk_kept_hand_table():
  r = _one([0.1, 0.2, 0.3, 0.4, 0.5], [2, 1, 1, 3, 1], [0, 1, 0, 0, 2],
           max_rank=5, remove_junk=False)
  assert r["mAP"] == pytest.approx((1 / 2 + 2 / 3 + 3 / 5) / 3)
  np.testing.assert_array_equal(r["cmc"], [0, 1, 1, 1, 1])
  assert r["mINP"] == pytest.approx(3 / 5)


def test_ties_keep_gallery_index_order():
  # Three items tie at 0.2; stable order: 3 (pos, 0.1), 0 (neg), 1 (pos), 2.
  r = _one([0.2, 0.2, 0.2, 0.1], [3, 1, 3, 1], [1, 1, 1, 1], max_rank=4)
  assert r["mAP"] == pytest.approx((1 / 1 + 2 / 3) / 2)
  assert r["mINP"] == pytest.approx(2 / 3)
  # A tied positive before or after a negative depends only on the index.
  assert _one([0.5, 0.5], [1, 2], [1, 1])["mAP"] == pytest.approx(1.0)
  assert _one([0.5, 0.5], [2, 1], [1, 1])["mAP"] == pytest.approx(0.5)
  np.testing.assert_array_equal(_one([0.5, 0.5], [2, 1], [1, 1], max_rank=2)["cmc"],
                                [0, 1])


def test_queries_without_true_match_are_skipped():
  distmat = np.array([[0.1, 0.2, 0.3],   # id 1: true match at rank 2
                      [0.1, 0.2, 0.3],   # id 7: not in the gallery
                      [0.3, 0.2, 0.1]],  # id 2: its only match is junk
                     np.float32)
  q_ids, q_cams = np.array([1, 7, 2]), np.array([0, 0, 5])
  g_ids, g_cams = np.array([3, 1, 2]), np.array([3, 4, 5])
  r = reference.rank_metrics(distmat, q_ids, g_ids, q_cams, g_cams, max_rank=3,
                           per_query=True)
  assert r["num_valid_queries"] == 1
  assert r["mAP"] == pytest.approx(0.5)
  np.testing.assert_array_equal(r["per_query"]["AP"], [0.5, np.nan, np.nan])
  np.testing.assert_array_equal(r["per_query"]["INP"], [0.5, np.nan, np.nan])
  np.testing.assert_array_equal(r["per_query"]["first_hit"], [1, -1, -1])
  assert "per_query" not in reference.rank_metrics(distmat, q_ids, g_ids, q_cams, g_cams)
  r = reference.rank_metrics(distmat, q_ids, g_ids, q_cams, g_cams, max_rank=3,
                           remove_junk=False)
  # Query id 2 now counts: its match is first -> AP 1, INP 1.
  assert r["num_valid_queries"] == 2
  assert r["mAP"] == pytest.approx((0.5 + 1) / 2)
  np.testing.assert_allclose(r["cmc"], [0.5, 1, 1])
  assert r["mINP"] == pytest.approx((1 / 2 + 1) / 2)


def test_short_gallery_cmc_keeps_last_value():
  r = _one([0.3, 0.1], [1, 2], [1, 1], max_rank=6)
  np.testing.assert_array_equal(r["cmc"], [0, 1, 1, 1, 1, 1])


def test_errors():
  with pytest.raises(ValueError, match="no query has a true match"):
    _one([0.1, 0.2], [5, 6], [1, 1])
  with pytest.raises(ValueError, match="g_ids has shape"):
    reference.rank_metrics(np.zeros((1, 3)), np.array([1]), np.array([1, 2]),
                         np.array([0]), np.array([0, 0, 0]))


def _brute_force(distmat, q_ids, g_ids, q_cams, g_cams, max_rank, remove_junk):
  """Rank of every gallery item by pairwise comparison, no sorting."""
  aps, inps, cmcs = [], [], []
  per_query = {"AP": [], "INP": [], "first_hit": []}
  num_g = distmat.shape[1]
  for q in range(distmat.shape[0]):
    def junk(k):
      return remove_junk and g_ids[k] == q_ids[q] and g_cams[k] == q_cams[q]
    kept = [k for k in range(num_g) if not junk(k)]
    def rank(j):
      return sum(1 for k in kept
                 if distmat[q, k] < distmat[q, j] or
                 (distmat[q, k] == distmat[q, j] and k < j))
    pos_ranks = sorted(rank(j) for j in kept if g_ids[j] == q_ids[q])
    if not pos_ranks:
      for k, v in (("AP", np.nan), ("INP", np.nan), ("first_hit", -1)):
        per_query[k].append(v)
      continue
    aps.append(np.mean([(i + 1) / (r + 1) for i, r in enumerate(pos_ranks)]))
    inps.append(len(pos_ranks) / (pos_ranks[-1] + 1))
    cmcs.append([float(pos_ranks[0] <= k) for k in range(max_rank)])
    for k, v in (("AP", aps[-1]), ("INP", inps[-1]), ("first_hit", pos_ranks[0])):
      per_query[k].append(v)
  return np.mean(aps), np.mean(cmcs, axis=0), np.mean(inps), len(aps), per_query


@pytest.mark.parametrize("remove_junk", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_brute_force_with_many_ties(seed, remove_junk):
  rng = np.random.default_rng(seed)
  num_q, num_g = 12, 30
  # Few distinct values, so ties are everywhere.
  distmat = rng.integers(0, 5, size=(num_q, num_g)).astype(np.float32)
  # Query ids 6 and 7 are not in the gallery: those queries are skipped.
  q_ids, g_ids = rng.integers(0, 8, num_q), rng.integers(0, 6, num_g)
  q_cams, g_cams = rng.integers(0, 3, num_q), rng.integers(0, 3, num_g)
  r = reference.rank_metrics(distmat, q_ids, g_ids, q_cams, g_cams, max_rank=10,
                           remove_junk=remove_junk, per_query=True)
  m_ap, cmc, m_inp, n, per_query = _brute_force(distmat, q_ids, g_ids, q_cams,
                                                g_cams, 10, remove_junk)
  assert r["num_valid_queries"] == n
  assert r["mAP"] == pytest.approx(m_ap, rel=1e-12)
  np.testing.assert_allclose(r["cmc"], cmc, rtol=1e-12)
  assert r["mINP"] == pytest.approx(m_inp, rel=1e-12)
  assert 0 < n < num_q  # some queries are skipped, so NaN / -1 are exercised
  for k in ("AP", "INP"):
    np.testing.assert_allclose(r["per_query"][k], per_query[k], rtol=1e-12)
  np.testing.assert_array_equal(r["per_query"]["first_hit"], per_query["first_hit"])
