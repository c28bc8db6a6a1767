"""Sparse, streamed k-reciprocal re-ranking against the dense oracle."""

import numpy as np
import pytest
from musp_jax.retrieval import reference
from musp_jax.retrieval import neighbours
from musp_jax.retrieval import rerank
from musp_jax.retrieval import ranking
from musp_jax.retrieval import saved_features
from musp_jax.core import features
from musp_jax.training import validate


# The two forms differ only by float32 rounding: distances from GEMMs of other
# shapes (a few ulps of values <= 1 after normalisation), V's row sums, the k2-row
# mean and the Jaccard overlaps (sums of <= a few hundred float32 terms in another
# order, each term and each sum <= 1: |error| <= terms x 2^-24 ~ 1e-5 at worst;
# measured <= 2.6e-7 (about 2 ulps of 1) on every case below, on AVX2 and with
# --xla_cpu_max_isa=AVX). 1e-6, four times that, is the bar the design asks for.
ATOL = 1e-6


def _clustered(rng, n, num_ids, p=3, c=8):
  """Images around identity centres: real k-reciprocal sets, not random ones."""
  centres = rng.standard_normal((num_ids, p, c)).astype(np.float32)
  ids = rng.integers(0, num_ids, n)
  feats = features.l2_normalize(centres[ids] + 0.6 * rng.standard_normal((n, p, c)))
  areas = rng.uniform(0.1, 1.0, (n, p)).astype(np.float32)
  return saved_features.Features(feats.astype(np.float32), areas, ids, rng.integers(0, 3, n))


def _lattice(rng, n, num_ids, p=2, c=6):
  """Features and areas of a few dyadic values, a third of the items duplicated:
  every sum is exact in float32, so distances tie exactly in both forms."""
  feats = (rng.integers(-1, 2, (n, p, c)) * 0.5).astype(np.float32)
  areas = rng.choice([0.25, 0.5, 1.0], (n, p)).astype(np.float32)
  dup = rng.integers(0, n - n // 3, n // 3)
  feats[-len(dup):], areas[-len(dup):] = feats[dup], areas[dup]
  return saved_features.Features(feats, areas, rng.integers(0, num_ids, n), rng.integers(0, 3, n))


def _oracle(q, g, distance, k1, k2, lam=0.3):
  """The dense oracle on retrieval's own distances (the squared member)."""
  plain = {"cam_squared": "cam_squared", "squared_euclidean": "euclidean"}[distance]
  dm = lambda a, b: ranking.distance_matrix(a, b, distance=plain, query_block=64)
  power = 2 if distance == "squared_euclidean" else 1
  return reference.k_reciprocal_rerank(dm(q, g) ** power, dm(q, q) ** power,
                                           dm(g, g) ** power, k1=k1, k2=k2,
                                           lambda_value=lam)


@pytest.mark.parametrize("make,distance,sizes,k1,k2,block", [
    (_clustered, "cam_squared", (20, 80), 6, 3, 16),  # many block pairs
    pytest.param(_clustered, "cam_squared", (30, 150), 20, 6, 64,  # the default k1, k2
                 marks=pytest.mark.numerics),
    (_lattice, "cam_squared", (15, 60), 6, 3, 16),  # exact ties
    (_lattice, "squared_euclidean", (25, 100), 20, 6, 32),
    (_clustered, "cam_squared", (12, 40), 20, 1, 2048),  # k2 = 1: no local expansion
])
def test_sparse_equals_dense_oracle(make, distance, sizes, k1, k2, block):
  rng = np.random.default_rng(sizes[1] + k1)
  q, g = make(rng, sizes[0], 10), make(rng, sizes[1], 10)
  encoding = rerank.KReciprocal(q, g, distance=distance, k1=k1, k2=k2, lambda_value=0.3,
                                block=block)
  np.testing.assert_allclose(encoding.matrix(), _oracle(q, g, distance, k1, k2),
                             rtol=0, atol=ATOL)
  if k1 == 20:  # step 2 adds members beyond the k1+1 lists: the pairwise path ran
    assert encoding.num_outside_lists > 0


@pytest.mark.parametrize("remove_junk", [True, False])
def test_evaluate_ranks_the_reranked_blocks(remove_junk):
  """ranking.evaluate(rerank=True) streams blocks; the ranking of the oracle's
  matrix gives the same metrics, junk removed or kept, ties included."""
  rng = np.random.default_rng(3)
  q, g = _lattice(rng, 24, 8), _lattice(rng, 90, 8)
  want = reference.rank_metrics(_oracle(q, g, "cam_squared", 20, 6), q.ids, g.ids, q.cams,
                              g.cams, max_rank=10, remove_junk=remove_junk)
  got = ranking.evaluate(q, g, rerank=True, remove_junk=remove_junk, max_rank=10,
                           query_block=8, per_query=True)
  assert got["rerank_input"] == "cam_squared"
  assert got["num_valid_queries"] == want["num_valid_queries"]
  # The same ranks give the same metrics: both finish them in float64 from integer
  # ranks, only the order of the float64 sums over <= 24 queries may differ (a few
  # ulps of 1; measured equal), while one swapped pair would move mAP by >= 1e-3.
  np.testing.assert_allclose(got["cmc"], want["cmc"], rtol=0, atol=1e-12)
  np.testing.assert_allclose([got["mAP"], got["mINP"]], [want["mAP"], want["mINP"]],
                             rtol=0, atol=1e-12)


def test_neighbours_equal_a_stable_sort():
  """Every item's list is its row of a stable argsort, ties in index order."""
  rng = np.random.default_rng(4)
  x = _lattice(rng, 70, 5)
  items = neighbours.JointItems([(x.feats[:20], x.areas[:20]), (x.feats[20:], x.areas[20:])])
  prepare, pair = rerank._SCORES["cam_squared"]
  found = neighbours.nearest(items, 9, prepare=prepare, pair=pair, block=16)
  dist = ranking.distance_matrix(x, x, distance="cam_squared")
  np.testing.assert_array_equal(found.index, np.argsort(dist.T, axis=1, kind="stable")[:, :9])
  np.testing.assert_array_equal(found.column_max, dist.max(axis=0))


def test_parameters_and_memory_refusal():
  rng = np.random.default_rng(5)
  q, g = _clustered(rng, 4, 2), _clustered(rng, 10, 2)
  for bad, match in (({"k1": 0}, "k1=0"), ({"k2": 8, "k1": 6}, "k2=8"),
                     ({"lambda_value": 1.5}, "lambda=1.5")):
    with pytest.raises(ValueError, match=match):
      rerank.KReciprocal(q, g, **{"k1": 20, "k2": 6, **bad})
  # VERI-Wild large fits 24 GiB; a million images with k1 = 100 do not.
  kw = dict(feature_values=5 * 2048, k2=6, query_block=1024, aqe=False)
  assert validate.rerank_memory_problem(10_000, 128_517, k1=20, available=24 << 30,
                                        **kw) is None
  problem = validate.rerank_memory_problem(100_000, 1_000_000, k1=100,
                                           available=24 << 30, **kw)
  assert "eval.rerank=True" in problem and "GiB" in problem
