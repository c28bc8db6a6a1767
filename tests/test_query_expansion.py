"""Alpha query expansion: fast-reid's aqe restated, and the CAM layout by definition."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from musp_jax import compat
from musp_jax.retrieval import ranking
from musp_jax.retrieval import saved_features
from musp_jax.core import features
from musp_jax.retrieval import query_expansion

# float32 both ways: one similarity differs by ~1 ulp between the two GEMMs; alpha
# multiplies that relative error and each round compounds it, on outputs of norm
# ~0.7-0.8 (means of similarity^alpha-weighted inputs of norm ~4). Measured: <= 5e-7
# for up to two rounds (AVX2 and --xla_cpu_max_isa=AVX), i.e. a few ulps of 1.
ATOL = 1e-6


def _fastreid_aqe(query_feat, gallery_feat, qe_times=1, qe_k=10, alpha=3.0):
  """fast-reid 1.4's fastreid/evaluation/query_expansion.py:aqe, restated."""
  num_query = query_feat.shape[0]
  feats = torch.cat((query_feat, gallery_feat), dim=0)
  unit = F.normalize(feats, p=2, dim=1)
  feats = feats.numpy()
  for _ in range(qe_times):
    rows = []
    for sim in torch.mm(unit, unit.t()).numpy():
      top = np.argpartition(-sim, range(1, qe_k + 1))[:qe_k]
      weights = np.power(sim[top].reshape(-1, 1), alpha)
      rows.append(np.mean(feats[top, :] * weights, axis=0))
    feats = np.stack(rows, axis=0)
    unit = F.normalize(torch.from_numpy(feats), p=2, dim=1)
  return torch.from_numpy(feats[:num_query]), torch.from_numpy(feats[num_query:])


@pytest.mark.parametrize("qe_times,qe_k,alpha", [
    (1, 10, 3.0), pytest.param(2, 5, 2.0, marks=pytest.mark.numerics)])
def test_compat_aqe_equals_fastreid(qe_times, qe_k, alpha):
  rng = np.random.default_rng(qe_times)
  q = torch.from_numpy(rng.standard_normal((30, 16)).astype(np.float32) + 0.3)
  g = torch.from_numpy(rng.standard_normal((90, 16)).astype(np.float32) + 0.3)
  want = _fastreid_aqe(q, g, qe_times, qe_k, alpha)
  got = compat.aqe(q, g, qe_times=qe_times, qe_k=qe_k, alpha=alpha)
  for x, y in zip(got, want):
    assert isinstance(x, torch.Tensor) and x.dtype == torch.float32
    np.testing.assert_allclose(x.numpy(), y.numpy(), rtol=0, atol=ATOL)
  arrays = compat.aqe(q.numpy(), g.numpy(), qe_times, qe_k, alpha)
  for x, y in zip(arrays, want):
    assert isinstance(x, np.ndarray)
    np.testing.assert_allclose(x, y.numpy(), rtol=0, atol=ATOL)
  with pytest.raises(ValueError, match="query_feat has shape"):
    compat.aqe(np.zeros((3, 2, 4), np.float32), g.numpy())
  with pytest.raises(ValueError, match="qe_k=0"):
    compat.aqe(q, g, qe_k=0)


def _cam_aqe_by_definition(feats, areas, qe_k, alpha):
  """One round of the CAM form, from its definition in float64 loops."""
  n, p, _ = feats.shape
  unit = feats / np.linalg.norm(feats, axis=-1, keepdims=True)
  out = np.zeros_like(feats, dtype=np.float64)
  for i in range(n):
    sim = np.array([sum(areas[i, b] * areas[j, b] * unit[i, b] @ unit[j, b]
                        for b in range(p)) / (areas[i] @ areas[j]) for j in range(n)])
    top = np.argsort(-sim, kind="stable")[:qe_k]
    for j in top:
      out[i] += sim[j] ** alpha * areas[j, :, None] * feats[j] / qe_k
  return out / np.linalg.norm(out, axis=-1, keepdims=True)


@pytest.mark.numerics
def test_cam_expansion_by_definition():
  rng = np.random.default_rng(7)
  make = lambda n: saved_features.Features(
      features.l2_normalize(rng.standard_normal((n, 3, 5)).astype(np.float32) + 0.5),
      rng.uniform(0.1, 1.0, (n, 3)).astype(np.float32), rng.integers(0, 5, n),
      rng.integers(0, 2, n))
  q, g = make(7), make(25)
  eq, eg = query_expansion.expand(q, g, distance="cam_squared", qe_k=4, alpha=3.0)
  want = _cam_aqe_by_definition(np.concatenate([q.feats, g.feats]),
                                np.concatenate([q.areas, g.areas]), 4, 3.0)
  # float32 against the float64 definition, on unit branches: each similarity is a
  # float32 sum of P x C = 15 products (relative error ~15 x 2^-24 ~ 1e-6 at worst),
  # raised to alpha = 3 (x3), averaged over qe_k and renormalised; measured <= 2.5e-7
  # on AVX2 and with --xla_cpu_max_isa=AVX.
  np.testing.assert_allclose(np.concatenate([eq.feats, eg.feats]), want, rtol=0,
                             atol=3e-6)
  np.testing.assert_array_equal(eg.areas, g.areas)  # areas are kept
  # evaluate(aqe=True) is evaluate on the expanded features.
  a = ranking.evaluate(q, g, aqe=True, qe_k=4, max_rank=5, remove_junk=False)
  b = ranking.evaluate(eq, eg, max_rank=5, remove_junk=False)
  assert a["mAP"] == b["mAP"] and np.array_equal(a["cmc"], b["cmc"])
