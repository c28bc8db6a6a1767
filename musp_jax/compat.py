"""Drop-in evaluation for PyTorch re-ID code (fast-reid, torchreid users).

    from musp_jax.compat import evaluate_rank
    cmc, all_AP, all_INP = evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids)
    mAP, mINP = np.mean(all_AP), np.mean(all_INP)        # cmc[0] is rank-1

    from musp_jax.compat import evaluate_features          # features in, same tuple out
    cmc, all_AP, all_INP = evaluate_features(q_feats, g_feats, q_pids, g_pids,
                                             q_camids, g_camids, metric="cosine")

    from musp_jax.compat import aqe                         # fast-reid's TEST.AQE
    query_feat, gallery_feat = aqe(query_feat, gallery_feat, qe_times=1, qe_k=10, alpha=3.0)

`evaluate_rank` has the signature and return types of fast-reid's
`fastreid.evaluation.rank.evaluate_rank` (its Python path, `eval_market1501`):

  cmc      numpy float32 array of length min(max_rank, G): the CMC curve
  all_AP   list of numpy float64, one per query that has a true match, in query order
  all_INP  the same for INP (true matches / rank of the last one)

`aqe` has the signature and results of fast-reid's
`fastreid.evaluation.query_expansion.aqe` (alpha query expansion of the joint
query + gallery set, musp_jax/retrieval/query_expansion.py), streamed: no (N, N)
similarity matrix. The rankings are computed by `musp_jax.retrieval.ranking`'s exact
on-device ranking, one (query_block, G) block at a time, so memory stays bounded for
any Q x G.
Junk (same id and same camera as the query) is removed, as in fast-reid.

Inputs may be numpy arrays, torch tensors or anything `np.asarray` takes. A CPU
tensor is read in place (no copy); a CUDA tensor is copied to the host once (the
ranking gathers each block's query rows on the host); bfloat16/float16 tensors
are widened to float32.

The one difference in results: equal distances are ordered by gallery index (a
stable sort), where fast-reid's `np.argsort` (quicksort) leaves their order to
the sort algorithm, so results on tied distances can differ; without ties the
CMC is equal and AP and INP agree to float64 rounding (both are float64 sums of
ratios of integer ranks). Beyond that, where fast-reid fails we answer: a query
with fewer kept gallery items than max_rank gets a CMC that keeps its last value
(fast-reid's Python path raises on the ragged rows), no valid query raises
ValueError (fast-reid: AssertionError), and `use_metric_cuhk03=True` (CUHK03's
single-shot protocol) is refused; `use_cython` is accepted and ignored.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from musp_jax.retrieval import ranking
from musp_jax.retrieval import saved_features


# --------------------------------------------------------------------------
# Inputs: numpy, torch (CPU or CUDA), lists.


def _is_torch_tensor(x: Any) -> bool:
  # Checked by class name so that torch is never imported here.
  return any(c.__name__ == "Tensor" and c.__module__.split(".")[0] == "torch"
             for c in type(x).__mro__)


def as_array(x: Any, name: str) -> np.ndarray:
  """A numpy view of `x` where possible (CPU torch tensors share memory)."""
  if _is_torch_tensor(x):
    x = x.detach()
    if x.device.type != "cpu":
      x = x.cpu()
    if str(x.dtype) in ("torch.bfloat16", "torch.float16"):
      x = x.float()  # numpy has no bfloat16; float16 distances would tie too often
    x = x.numpy()
  try:
    return np.asarray(x)
  except (TypeError, ValueError) as e:
    raise TypeError(f"{name}: cannot be read as an array ({type(x).__name__}: {e})") from None


def _labels(x: Any, name: str, n: int, n_name: str) -> np.ndarray:
  x = as_array(x, name)
  if x.shape != (n,):
    raise ValueError(f"{name} has shape {x.shape}; expected ({n},), one per row of "
                     f"{n_name}")
  if x.dtype.kind not in "iuUS":
    raise ValueError(f"{name} has dtype {x.dtype}; expected integer (or string) labels")
  return x


def _features(x: Any, name: str) -> np.ndarray:
  x = as_array(x, name)
  if x.dtype.kind not in "fiu":
    raise ValueError(f"{name} has dtype {x.dtype}; expected float features")
  if x.ndim not in (2, 3) or 0 in x.shape:
    raise ValueError(f"{name} has shape {x.shape}; expected (N, D) or (N, P, C), "
                     "non-empty")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name} has NaN or infinite values")
  x = x.astype(np.float32, copy=False)
  return x[:, None, :] if x.ndim == 2 else x


def _check_max_rank(max_rank: Any, use_metric_cuhk03: bool) -> int:
  if use_metric_cuhk03:
    raise ValueError("use_metric_cuhk03=True: the CUHK03 single-shot protocol is not "
                     "implemented here; use fast-reid's evaluate_rank for it")
  if isinstance(max_rank, bool) or not isinstance(max_rank, (int, np.integer)) or max_rank < 1:
    raise ValueError(f"max_rank={max_rank!r}; expected an integer >= 1")
  return int(max_rank)


def _fastreid_tuple(result: dict[str, Any], num_g: int, max_rank: int
                    ) -> tuple[np.ndarray, list, list]:
  """retrieval's result -> (cmc float32 (min(max_rank, G),), [AP], [INP])."""
  per_query = result["per_query"]
  valid = per_query["first_hit"] >= 0
  cmc = np.asarray(result["cmc"][:min(max_rank, num_g)], np.float32)
  return (cmc, [np.float64(v) for v in per_query["AP"][valid]],
          [np.float64(v) for v in per_query["INP"][valid]])


# --------------------------------------------------------------------------
# Public calls.


def evaluate_rank(distmat: Any, q_pids: Any, g_pids: Any, q_camids: Any, g_camids: Any,
                  max_rank: int = 50, use_metric_cuhk03: bool = False,
                  use_cython: bool = True, *, query_block: int = 1024,
                  mesh=None) -> tuple[np.ndarray, list, list]:
  """fast-reid's `evaluate_rank`: (cmc, all_AP, all_INP) of a (Q, G) distance matrix.

  Args:
    distmat: (Q, G) distances, smaller is more similar.
    q_pids, g_pids, q_camids, g_camids: (Q,), (G,), (Q,), (G,) integer labels.
    max_rank: CMC length (at most G, as fast-reid).
    use_metric_cuhk03: must be False (see the module docstring).
    use_cython: ignored (accepted for drop-in use).
    query_block, mesh: as `ranking.rank_distmat`.
  """
  del use_cython
  max_rank = _check_max_rank(max_rank, use_metric_cuhk03)
  distmat = as_array(distmat, "distmat")
  if distmat.ndim != 2 or 0 in distmat.shape:
    raise ValueError(f"distmat has shape {distmat.shape}; expected (num_query, "
                     "num_gallery), non-empty")
  if distmat.dtype.kind not in "fiu":
    raise ValueError(f"distmat has dtype {distmat.dtype}; expected float distances")
  if np.isnan(distmat).any():
    raise ValueError("distmat has NaN values; distances must be ordered")
  num_q, num_g = distmat.shape
  labels = (_labels(q_pids, "q_pids", num_q, "distmat"),
            _labels(g_pids, "g_pids", num_g, "distmat's columns"),
            _labels(q_camids, "q_camids", num_q, "distmat"),
            _labels(g_camids, "g_camids", num_g, "distmat's columns"))
  result = ranking.rank_distmat(distmat, *labels, max_rank=min(max_rank, num_g),
                                  remove_junk=True, query_block=query_block, mesh=mesh,
                                  per_query=True)
  return _fastreid_tuple(result, num_g, max_rank)


def evaluate_features(q_feats: Any, g_feats: Any, q_pids: Any, g_pids: Any,
                      q_camids: Any, g_camids: Any, *, q_areas: Any = None,
                      g_areas: Any = None, metric: str = "euclidean", max_rank: int = 50,
                      rerank: bool = False, k1: int = 20, k2: int = 6,
                      lambda_value: float = 0.3, query_block: int = 1024,
                      mesh=None) -> tuple[np.ndarray, list, list]:
  """(cmc, all_AP, all_INP) as `evaluate_rank`, from query and gallery features.

  Args:
    q_feats, g_feats: (N, D) features, or (N, P, C) per-branch features.
    q_pids, g_pids, q_camids, g_camids: integer labels, one per row.
    q_areas, g_areas: (N, P) branch weights, for the cam distances only
      (required there when P > 1).
    metric: one of `ranking.DISTANCES`: "euclidean" and "cosine" act on the
      concatenated feature; "cam_squared" / "cam" weigh branches by area.
      (fast-reid's "euclidean" is the squared distance: the same ranking.)
    rerank, k1, k2, lambda_value: k-reciprocal re-ranking, computed from the
      squared distance (`ranking.RERANK_INPUT`), as the original method.
    query_block, mesh: as `ranking.evaluate`.
  """
  max_rank = _check_max_rank(max_rank, False)
  if metric not in ranking.DISTANCES:
    raise ValueError(f"metric={metric!r}; expected one of {ranking.DISTANCES}")
  sets = []
  for side, feats, pids, camids, areas in (("q", q_feats, q_pids, q_camids, q_areas),
                                           ("g", g_feats, g_pids, g_camids, g_areas)):
    feats = _features(feats, f"{side}_feats")
    n, p = feats.shape[:2]
    if areas is None:
      if metric.startswith("cam") and p > 1:
        raise ValueError(f"metric={metric!r} weighs the {p} branches by area: pass "
                         f"{side}_areas ({n}, {p})")
      areas = np.ones((n, p), np.float32)
    else:
      if not metric.startswith("cam"):
        raise ValueError(f"{side}_areas is used by the cam distances only, not "
                         f"metric={metric!r}")
      areas = as_array(areas, f"{side}_areas")
      if areas.shape != (n, p) or areas.dtype.kind != "f":
        raise ValueError(f"{side}_areas has shape {areas.shape} and dtype {areas.dtype}; "
                         f"expected float ({n}, {p}) to match {side}_feats")
    sets.append(saved_features.Features(
        feats, areas.astype(np.float32, copy=False),
        _labels(pids, f"{side}_pids", n, f"{side}_feats"),
        _labels(camids, f"{side}_camids", n, f"{side}_feats")))
  query, gallery = sets
  if query.feats.shape[1:] != gallery.feats.shape[1:]:
    raise ValueError(f"q_feats {query.feats.shape} and g_feats {gallery.feats.shape} "
                     "differ in their feature shape")
  result = ranking.evaluate(query, gallery, distance=metric, remove_junk=True,
                              max_rank=min(max_rank, len(gallery)),
                              query_block=query_block, rerank=rerank, rerank_k1=k1,
                              rerank_k2=k2, rerank_lambda=lambda_value, mesh=mesh,
                              per_query=True)
  return _fastreid_tuple(result, len(gallery), max_rank)


def aqe(query_feat: Any, gallery_feat: Any, qe_times: int = 1, qe_k: int = 10,
        alpha: float = 3.0) -> tuple[Any, Any]:
  """fast-reid's `aqe`: (query_feat, gallery_feat) after alpha query expansion.

  Args:
    query_feat, gallery_feat: (Nq, D) and (Ng, D) features, numpy arrays or torch
      tensors (the results are of the same kind, on the same device).
    qe_times, qe_k, alpha: rounds, neighbours averaged (the item included) and
      the exponent of their similarity weights, as fast-reid.

  The results are not normalised, as fast-reid's; computed in float32 (returned
  in the input's floating dtype).
  """
  from musp_jax.retrieval import query_expansion
  arrays = []
  for name, x in (("query_feat", query_feat), ("gallery_feat", gallery_feat)):
    a = _features(x, name)
    if a.shape[1] != 1:
      raise ValueError(f"{name} has shape {as_array(x, name).shape}; expected (N, D)")
    arrays.append(a)
  if arrays[0].shape[2] != arrays[1].shape[2]:
    raise ValueError(f"query_feat has {arrays[0].shape[2]} dimensions, gallery_feat "
                     f"{arrays[1].shape[2]}")
  out = query_expansion.expand_arrays(
      [(a, np.ones(a.shape[:2], np.float32)) for a in arrays], kind="plain",
      qe_times=qe_times, qe_k=qe_k, alpha=alpha)
  return tuple(_like(o[:, 0, :], x) for o, x in zip(out, (query_feat, gallery_feat)))


def _like(result: np.ndarray, original: Any) -> Any:
  """`result` as the kind of array `original` is (torch tensor: same device)."""
  if _is_torch_tensor(original):
    import torch
    dtype = original.dtype if original.dtype.is_floating_point else torch.float32
    return torch.from_numpy(result).to(device=original.device, dtype=dtype)
  original = np.asarray(original)
  return result.astype(original.dtype if original.dtype.kind == "f" else np.float32,
                       copy=False)
