"""Pure-numpy reference of the retrieval metrics (docs/design.md section 5).

This is the slow, obviously-correct definition that the on-device ranking in
`ranking.py` is tested against (and, at the end, the dense k-reciprocal re-ranking
that rerank.py's sparse form is tested against). Per query:

  1. order the gallery by ascending distance; ties keep gallery index order
     (a stable sort), so the result never depends on the sort algorithm;
  2. drop junk: gallery items with the query's id AND camera (if `remove_junk`);
  3. skip the query if no true match (same id) is left;
  4. CMC@k = 1 if the first true match is within the top k;
     AP = mean over true matches of the precision at that match's rank;
     INP = (number of true matches) / (rank of the last true match).

The CMC curve is always `max_rank` long: past the end of a short gallery it
keeps its last value (1, since every counted query has a true match).

With `per_query=True` the result also holds each query's AP, INP and first-hit
rank (0-based rank of its first true match after junk removal), in query order;
a skipped query has AP = INP = NaN and first_hit = -1.
"""

from typing import Any

import numpy as np


def _check_shapes(distmat, q_ids, g_ids, q_cams, g_cams):
  num_q, num_g = distmat.shape
  for name, arr, n in (("q_ids", q_ids, num_q), ("g_ids", g_ids, num_g),
                       ("q_cams", q_cams, num_q), ("g_cams", g_cams, num_g)):
    if arr.shape != (n,):
      raise ValueError(
          f"rank_metrics: {name} has shape {arr.shape}, expected ({n},) to "
          f"match distmat of shape {distmat.shape}")


def rank_metrics(distmat: np.ndarray,
                 q_ids: np.ndarray,
                 g_ids: np.ndarray,
                 q_cams: np.ndarray,
                 g_cams: np.ndarray,
                 *,
                 max_rank: int = 50,
                 remove_junk: bool = True,
                 per_query: bool = False) -> dict[str, Any]:
  """CMC, mAP and mINP of a (Q, G) distance matrix.

  Args:
    distmat: (Q, G) distances, smaller is more similar.
    q_ids, g_ids: (Q,), (G,) identity labels.
    q_cams, g_cams: (Q,), (G,) camera labels (ignored without junk removal).
    max_rank: length of the returned CMC curve.
    remove_junk: drop gallery items sharing the query's id and camera.
    per_query: also return "per_query": {"AP": (Q,) float64, "INP": (Q,)
      float64, "first_hit": (Q,) int64}, NaN / -1 for skipped queries.

  Returns:
    {"mAP": float, "cmc": (max_rank,) float64, "mINP": float,
     "num_valid_queries": int} (+ "per_query").

  Raises:
    ValueError: on mismatched shapes, or if no query has a true match.
  """
  distmat = np.asarray(distmat)
  if distmat.ndim != 2:
    raise ValueError(f"rank_metrics: distmat must be 2-D, got {distmat.shape}")
  q_ids, g_ids = np.asarray(q_ids), np.asarray(g_ids)
  q_cams, g_cams = np.asarray(q_cams), np.asarray(g_cams)
  _check_shapes(distmat, q_ids, g_ids, q_cams, g_cams)

  num_q = distmat.shape[0]
  cmc_sum = np.zeros(max_rank, np.float64)
  ap_sum = inp_sum = 0.0
  num_valid = 0
  all_ap, all_inp = np.full(num_q, np.nan), np.full(num_q, np.nan)
  first_hit = np.full(num_q, -1, np.int64)
  for q in range(num_q):
    order = np.argsort(distmat[q], kind="stable")
    match = g_ids[order] == q_ids[q]
    if remove_junk:
      junk = match & (g_cams[order] == q_cams[q])
      match = match[~junk]
    if not match.any():
      continue
    num_valid += 1
    hits = np.cumsum(match)  # true matches within the top (i + 1)
    cmc = np.minimum(hits, 1).astype(np.float64)
    if cmc.size < max_rank:
      cmc = np.concatenate([cmc, np.full(max_rank - cmc.size, cmc[-1])])
    cmc_sum += cmc[:max_rank]
    ranks = np.flatnonzero(match)  # 0-based ranks of the true matches
    all_ap[q] = np.mean(hits[ranks] / (ranks + 1.0))
    all_inp[q] = hits[-1] / (ranks[-1] + 1.0)
    first_hit[q] = ranks[0]
    ap_sum += all_ap[q]
    inp_sum += all_inp[q]
  if num_valid == 0:
    raise ValueError("rank_metrics: no query has a true match in the gallery "
                     "(after junk removal); nothing to evaluate")
  result = {
      "mAP": ap_sum / num_valid,
      "cmc": cmc_sum / num_valid,
      "mINP": inp_sum / num_valid,
      "num_valid_queries": num_valid,
  }
  if per_query:
    result["per_query"] = {"AP": all_ap, "INP": all_inp, "first_hit": first_hit}
  return result


# --------------------------------------------------------------------------
# k-reciprocal re-ranking, dense.


def _reciprocal(initial_rank: np.ndarray, i: int, k: int) -> np.ndarray:
  forward = initial_rank[i, :k + 1]
  backward = initial_rank[forward, :k + 1]
  return forward[np.any(backward == i, axis=1)]


def k_reciprocal_rerank(q_g: np.ndarray, q_q: np.ndarray, g_g: np.ndarray, *,
                        k1: int = 20, k2: int = 6,
                        lambda_value: float = 0.3) -> np.ndarray:
  """Re-ranked (Q, G) distances from the q-g, q-q and g-g squared distances: the
  dense form, step by step as retrieval/rerank.py's docstring states them (the
  oracle of `rerank.KReciprocal`)."""
  num_q, num_g = q_g.shape
  if q_q.shape != (num_q, num_q) or g_g.shape != (num_g, num_g):
    raise ValueError(f"k_reciprocal_rerank: shapes q_g {q_g.shape}, q_q "
                     f"{q_q.shape}, g_g {g_g.shape} do not fit together")
  dist = np.block([[q_q, q_g], [q_g.T, g_g]]).astype(np.float32)
  # Normalise so exp(-d) in step 3 does not depend on the distance's scale.
  dist = (dist / np.max(dist, axis=0)).T
  n = dist.shape[0]
  initial_rank = np.argsort(dist, axis=1, kind="stable")
  half = int(np.around(k1 / 2.0))

  v = np.zeros((n, n), np.float32)
  for i in range(n):
    members = _reciprocal(initial_rank, i, k1)
    expansion = [members]
    for c in members:
      candidate = _reciprocal(initial_rank, c, half)
      if len(np.intersect1d(candidate, members)) > 2.0 / 3.0 * len(candidate):
        expansion.append(candidate)
    expanded = np.unique(np.concatenate(expansion))
    weight = np.exp(-dist[i, expanded])
    v[i, expanded] = weight / np.sum(weight)

  if k2 > 1:
    v_qe = np.empty_like(v)
    for lo in range(0, n, 256):  # bounded temporary (rows x k2 x n)
      v_qe[lo:lo + 256] = v[initial_rank[lo:lo + 256, :k2]].mean(axis=1)
    v = v_qe
  del initial_rank

  # Columns of V restricted to gallery rows, transposed so that the rows we
  # gather (a query's non-zero columns) are contiguous.
  v_gallery_T = np.ascontiguousarray(v[num_q:].T)  # (n, G)
  jaccard = np.empty((num_q, num_g), np.float32)
  for i in range(num_q):
    nonzero = np.flatnonzero(v[i])
    overlap = np.sum(np.minimum(v[i, nonzero, None], v_gallery_T[nonzero]), axis=0)
    # Rows sum to 1, so sum max = 2 - sum min.
    jaccard[i] = 1.0 - overlap / (2.0 - overlap)
  return jaccard * (1.0 - lambda_value) + dist[:num_q, num_q:] * lambda_value
