"""Blocked distances and on-device ranking against direct numpy references."""

import jax
import numpy as np
import pytest

from musp_jax.retrieval import reference
from musp_jax.retrieval import ranking
from musp_jax.retrieval import saved_features
from musp_jax.core import features


def _features(rng, n, p=3, c=8, num_ids=8, num_cams=3, normalize=True):
  feats = rng.normal(size=(n, p, c)).astype(np.float32)
  if normalize:
    feats = features.l2_normalize(feats)
  areas = rng.uniform(0.05, 1.0, size=(n, p)).astype(np.float32)
  return saved_features.Features(feats, areas, rng.integers(0, num_ids, n),
                            rng.integers(0, num_cams, n))


def cam_distance_atol(parts: int, channels: int) -> float:
  """How far one float32 CAM distance of unit features may be from the exact one.

  The expanded form sums P C products (the GEMM) and P norm terms, then divides by
  a_q . a_g: (P C + 2 P) roundings of u = 2^-24, relative to the terms' size, at most 4
  (|f_q|^2 + |f_g|^2 + 2 |f_q| |f_g| with unit features), in the worst case.
  """
  return (parts * channels + 2 * parts) * 2.0**-24 * 4.0


def _direct_cam(qf, qa, gf, ga, squared):
  """The formula as written: a dense (Q, G, P) tensor."""
  diff = qf[:, None].astype(np.float64) - gf[None].astype(np.float64)
  d_QxGxP = np.sum(diff**2, axis=-1)
  if not squared:
    d_QxGxP = np.sqrt(d_QxGxP)
  w_QxGxP = qa[:, None, :].astype(np.float64) * ga[None, :, :]
  w_QxGxP /= w_QxGxP.sum(-1, keepdims=True)
  return np.sum(w_QxGxP * d_QxGxP, axis=-1)


@pytest.mark.parametrize("normalize", [True, pytest.param(False, marks=pytest.mark.numerics)])
@pytest.mark.parametrize("squared", [True, False])
def test_cam_distance_equals_direct_formula(squared, normalize):
  rng = np.random.default_rng(0)
  q, g = _features(rng, 9, 5, 16, normalize=normalize), _features(rng, 13, 5, 16)
  got = ranking.pairwise_distance(q.feats, q.areas, g.feats, g.areas,
                                     distance="cam_squared" if squared else "cam")
  want = _direct_cam(q.feats, q.areas, g.feats, g.areas, squared)
  # cam_distance_atol(5, 16) = 2.1e-5 for unit features (1e-5 + 1e-5 relative to
  # D ~ 2, and unnormalised ones are larger); measured 2.4% of the bound (AVX2, AVX).
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


@pytest.mark.numerics
def test_concatenated_distances():
  rng = np.random.default_rng(1)
  q, g = _features(rng, 7), _features(rng, 11)
  xq, xg = q.feats.reshape(7, -1), g.feats.reshape(11, -1)
  cos = (xq @ xg.T) / np.outer(np.linalg.norm(xq, axis=1), np.linalg.norm(xg, axis=1))
  euclid = np.linalg.norm(xq[:, None] - xg[None], axis=-1)
  for name, want in (("cosine", 1 - cos), ("euclidean", euclid)):
    got = ranking.pairwise_distance(q.feats, q.areas, g.feats, g.areas,
                                      distance=name)
    # 24 float32 terms of unit vectors: cam_distance_atol(3, 8) = 7.2e-6 at most;
    # measured 2.4e-7 (AVX2 and AVX).
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def _problem(seed, num_q=45, num_g=70, levels=6):
  rng = np.random.default_rng(seed)
  # Few distinct values, so many ties (also between true matches and junk).
  distmat = rng.integers(0, levels, size=(num_q, num_g)).astype(np.float32)
  # Query ids 9 and 10 are not in the gallery: those queries are skipped.
  labels = (rng.integers(0, 11, num_q), rng.integers(0, 9, num_g),
            rng.integers(0, 3, num_q), rng.integers(0, 3, num_g))
  return distmat, labels


def _assert_same(got, want):
  # Both sides are float64 sums of the same ratios of integer ranks, in another order
  # (and the means over queries in another order): a 2^-53 rounding per term, 1e-12.
  assert got["num_valid_queries"] == want["num_valid_queries"]
  assert got["mAP"] == pytest.approx(want["mAP"], rel=1e-12)
  np.testing.assert_allclose(got["cmc"], want["cmc"], rtol=1e-12)
  assert got["mINP"] == pytest.approx(want["mINP"], rel=1e-12)
  assert ("per_query" in got) == ("per_query" in want)
  if "per_query" in want:
    got, want = got["per_query"], want["per_query"]
    # NaN (no true match) must be at the same queries: assert_allclose checks.
    np.testing.assert_allclose(got["AP"], want["AP"], rtol=1e-12)
    np.testing.assert_allclose(got["INP"], want["INP"], rtol=1e-12)
    np.testing.assert_array_equal(got["first_hit"], want["first_hit"])


@pytest.mark.parametrize("query_block", [1, 8, 13, 64])
@pytest.mark.parametrize("remove_junk", [True, False])
def test_device_ranking_equals_reference(query_block, remove_junk):
  assert jax.device_count() == 8  # the gallery is sharded over 8 devices
  for seed in range(2):
    distmat, labels = _problem(seed)
    want = reference.rank_metrics(distmat, *labels, max_rank=20,
                                remove_junk=remove_junk, per_query=True)
    assert np.sum(want["per_query"]["first_hit"] < 0) > 0  # some are skipped
    got = ranking.rank_distmat(distmat, *labels, max_rank=20,
                                 remove_junk=remove_junk, query_block=query_block,
                                 per_query=True)
    _assert_same(got, want)


def test_device_ranking_on_one_device_and_long_cmc():
  distmat, labels = _problem(3, num_q=20, num_g=30)
  mesh = jax.make_mesh((1,), ("gallery",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:1])
  want = reference.rank_metrics(distmat, *labels, max_rank=50)  # longer than G
  _assert_same(ranking.rank_distmat(distmat, *labels, max_rank=50, mesh=mesh,
                                      query_block=7), want)


@pytest.mark.parametrize("distance", [
    pytest.param(d, marks=pytest.mark.numerics) if d == "cam" else d for d in ranking.DISTANCES])
def test_evaluate_features_equals_reference(distance):
  rng = np.random.default_rng(2)
  q, g = _features(rng, 30), _features(rng, 53)
  # Duplicated gallery items give exact ties in the computed distances.
  g = saved_features.Features(np.concatenate([g.feats, g.feats[:10]]),
                         np.concatenate([g.areas, g.areas[:10]]),
                         np.concatenate([g.ids, (g.ids[:10] + 1) % 8]),
                         np.concatenate([g.cams, g.cams[:10]]))
  distmat = ranking.distance_matrix(q, g, distance=distance, query_block=16)
  direct = np.asarray(ranking.pairwise_distance(q.feats, q.areas, g.feats,
                                                  g.areas, distance=distance))
  # Two float32 programs (blocked and sharded, or one call): twice one distance's
  # bound. (atol=1e-6 was 57% used on AVX: 7.2e-7.)
  np.testing.assert_allclose(distmat, direct, atol=2 * cam_distance_atol(3, 8))
  want = reference.rank_metrics(distmat, q.ids, g.ids, q.cams, g.cams, max_rank=10,
                              per_query=True)
  for block in (7, 30):  # ragged and single-block
    got = ranking.evaluate(q, g, distance=distance, max_rank=10,
                             query_block=block, per_query=True)
    _assert_same(got, want)


def test_evaluate_from_saved_features(tmp_path):
  rng = np.random.default_rng(3)
  q, g = _features(rng, 12), _features(rng, 25)
  q = saved_features.Features(q.feats, q.areas, q.ids, q.cams,
                         np.array([f"q{i}.jpg" for i in range(12)]), "musp P=3 C=8")
  saved_features.save_features(tmp_path / "q.npz", q)
  saved_features.save_features(tmp_path / "g.npz", g)
  loaded = saved_features.load_features(tmp_path / "q.npz")
  np.testing.assert_array_equal(loaded.feats, q.feats)
  np.testing.assert_array_equal(loaded.file_names, q.file_names)
  assert loaded.model_signature == "musp P=3 C=8"
  _assert_same(ranking.evaluate(str(tmp_path / "q.npz"), tmp_path / "g.npz"),
               ranking.evaluate(q, g))
  np.savez(tmp_path / "bad.npz", feats=q.feats)
  with pytest.raises(ValueError, match="missing keys"):
    saved_features.load_features(tmp_path / "bad.npz")


def _rerank_by_definition(q_g, q_q, g_g, k1, k2, lam):
  """k-reciprocal re-ranking written from the paper with sets and loops."""
  num_q = q_g.shape[0]
  d = np.block([[q_q, q_g], [q_g.T, g_g]]).astype(np.float64)
  n = d.shape[0]
  d = d / d.max(axis=1, keepdims=True)  # symmetric input: row max = column max
  nearest = [list(np.argsort(d[i], kind="stable")) for i in range(n)]

  def recip(i, k):
    return {j for j in nearest[i][:k + 1] if i in nearest[j][:k + 1]}

  v = np.zeros((n, n))
  for i in range(n):
    r = recip(i, k1)
    expanded = set(r)
    for c in r:
      rc = recip(c, int(round(k1 / 2)))
      if len(rc & r) > 2 / 3 * len(rc):
        expanded |= rc
    for j in expanded:
      v[i, j] = np.exp(-d[i, j])
    v[i] /= v[i].sum()
  v = np.array([v[nearest[i][:k2]].mean(0) for i in range(n)])
  out = np.zeros(q_g.shape)
  for i in range(num_q):
    for j in range(q_g.shape[1]):
      g = num_q + j
      jac = 1 - np.minimum(v[i], v[g]).sum() / np.maximum(v[i], v[g]).sum()
      out[i, j] = (1 - lam) * jac + lam * d[i, g]
  return out


@pytest.mark.numerics
def test_rerank_matches_definition():
  rng = np.random.default_rng(5)
  q, g = _features(rng, 6, num_ids=3), _features(rng, 14, num_ids=3)
  dm = lambda a, b: ranking.distance_matrix(a, b, query_block=8)
  q_g, q_q, g_g = dm(q, g), dm(q, q), dm(g, g)
  # Symmetrise q_q, g_g exactly so both row- and column-normalisation agree.
  q_q, g_g = (q_q + q_q.T) / 2, (g_g + g_g.T) / 2
  got = reference.k_reciprocal_rerank(q_g, q_q, g_g, k1=4, k2=3, lambda_value=0.3)
  want = _rerank_by_definition(q_g, q_q, g_g, 4, 3, 0.3)
  # The same float32 inputs; re-ranking's own sums (Jaccard over 20 items) in another
  # order, on values <= 1: a few ulps; measured 9.4e-8 (AVX2 and AVX).
  np.testing.assert_allclose(got, want, atol=1e-5)
  result = ranking.evaluate(q, g, rerank=True, rerank_k1=4, rerank_k2=3,
                              return_distmat=True, max_rank=5)
  _assert_same(result, reference.rank_metrics(result["distmat"], q.ids, g.ids,
                                            q.cams, g.cams, max_rank=5))


def _squared_reference(q, g, distance):
  """The re-ranking input each distance should give, in float64 numpy."""
  if distance in ("cam", "cam_squared"):
    return _direct_cam(q.feats, q.areas, g.feats, g.areas, squared=True)
  xq = q.feats.reshape(len(q), -1).astype(np.float64)
  xg = g.feats.reshape(len(g), -1).astype(np.float64)
  if distance == "cosine":
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    xg /= np.linalg.norm(xg, axis=1, keepdims=True)
    return 1.0 - xq @ xg.T
  return np.sum((xq[:, None] - xg[None]) ** 2, axis=-1)


@pytest.mark.parametrize("distance", ranking.DISTANCES)
def test_rerank_takes_squared_distances(distance):
  """Re-ranking is computed from the squared-Euclidean member of each distance."""
  rng = np.random.default_rng(6)
  q, g = _features(rng, 6, num_ids=3), _features(rng, 14, num_ids=3)
  ref = [_squared_reference(a, b, distance).astype(np.float32)
         for a, b in ((q, g), (q, q), (g, g))]
  want = reference.k_reciprocal_rerank(*ref, k1=4, k2=3, lambda_value=0.3)
  result = ranking.evaluate(q, g, distance=distance, rerank=True, rerank_k1=4,
                              rerank_k2=3, return_distmat=True, max_rank=5)
  assert result["rerank_input"] == ranking.RERANK_INPUT[distance]
  # float32 device distances against float64 ones rounded to float32 (at most
  # cam_distance_atol(3, 8) = 7.2e-6 apart), through re-ranking: measured 1.2e-7.
  np.testing.assert_allclose(result["distmat"], want, atol=1e-5)
  if distance == "euclidean":  # not the plain distance: that re-ranks differently
    plain = reference.k_reciprocal_rerank(*(np.sqrt(r) for r in ref), k1=4, k2=3,
                                       lambda_value=0.3)
    assert np.max(np.abs(plain - want)) > 1e-2


def test_plain_features_format(tmp_path):
  """feats (N, D) + pids + camids: one branch, equal weights."""
  rng = np.random.default_rng(7)
  qx, gx = rng.normal(size=(9, 12)), rng.normal(size=(20, 12))
  q_ids, g_ids = rng.integers(0, 4, 9), rng.integers(0, 4, 20)
  q_cams, g_cams = rng.integers(0, 2, 9), rng.integers(0, 2, 20)
  np.savez(tmp_path / "q.npz", feats=qx.astype(np.float32), pids=q_ids, camids=q_cams)
  np.savez(tmp_path / "g.npz", feats=gx, pids=g_ids, camids=g_cams)  # float64 is fine
  q = saved_features.load_features(tmp_path / "q.npz")
  assert q.feats.shape == (9, 1, 12) and q.feats.dtype == np.float32
  np.testing.assert_array_equal(q.areas, np.ones((9, 1)))
  np.testing.assert_array_equal(q.ids, q_ids)
  assert q.file_names is None and q.model_signature == ""
  euclid = np.linalg.norm(qx[:, None] - gx[None], axis=-1)
  want = reference.rank_metrics(euclid, q_ids, g_ids, q_cams, g_cams, max_rank=5)
  for distance in ("euclidean", "cam_squared"):  # P = 1: the same ranking
    _assert_same(ranking.evaluate(tmp_path / "q.npz", tmp_path / "g.npz",
                                    distance=distance, max_rank=5), want)
  # (N, P, C) with areas reads as the saved-features format does.
  f = _features(rng, 5)
  np.savez(tmp_path / "p.npz", feats=f.feats, areas=f.areas, pids=f.ids, camids=f.cams)
  p = saved_features.load_features(tmp_path / "p.npz")
  np.testing.assert_array_equal(p.feats, f.feats)
  np.testing.assert_array_equal(p.areas, f.areas)
