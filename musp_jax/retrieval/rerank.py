"""k-reciprocal re-ranking (Zhong et al., CVPR 2017), in numpy.

It needs the whole (Q+G) x (Q+G) distance matrix on the host, so it is meant
for sets that fit in memory (VeRi-776, VehicleID); `ranking.evaluate` calls
it when `rerank=True` and ranks the result on the device.

Input convention: the method is defined on squared Euclidean distances (Zhong
et al. square the Euclidean distance first; fast-reid and torchreid pass
squared distances), and its result depends on that choice (step 3 weighs
neighbours by exp(-d), step 6 mixes d in). Pass squared distances: squared L2,
cam_squared, or 1 - cos (half the squared L2 of normalised features; the scale
cancels in the normalisation below). `ranking.evaluate` does so for every
`distance` through `retrieval.RERANK_INPUT`; a plain Euclidean or `cam`
distance is re-ranked through its squared counterpart.

Steps, for every item i of the joint query+gallery set, with the input
distance normalised by each row's maximum (the matrix is symmetric):
  1. R(i, k1): the k1-reciprocal neighbours (i is among their k1+1 nearest);
  2. expand R with R(c, k1/2) of each member c when at least 2/3 of it is
     already in R;
  3. V[i] = exp(-d(i, R*)) normalised to sum 1 (zero elsewhere);
  4. local query expansion: V[i] <- mean of V over i's k2 nearest;
  5. Jaccard distance d_J(q, g) = 1 - sum min(V_q, V_g) / sum max(V_q, V_g);
  6. final = (1 - lambda) d_J + lambda d.
Nearest-neighbour lists use a stable sort (ties in index order).
"""

import numpy as np


def _reciprocal(initial_rank: np.ndarray, i: int, k: int) -> np.ndarray:
  forward = initial_rank[i, :k + 1]
  backward = initial_rank[forward, :k + 1]
  return forward[np.any(backward == i, axis=1)]


def k_reciprocal_rerank(q_g: np.ndarray, q_q: np.ndarray, g_g: np.ndarray, *,
                        k1: int = 20, k2: int = 6,
                        lambda_value: float = 0.3) -> np.ndarray:
  """Re-ranked (Q, G) distances from the q-g, q-q and g-g squared distances."""
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
