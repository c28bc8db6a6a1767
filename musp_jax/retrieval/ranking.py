"""CAM-weighted distance and exact on-device ranking, streamed in query blocks.

Distances (docs/design.md section 4), for features f (N, P, C) and areas a (N, P):

  cam_squared  D = sum_p w_p ||f_q^p - f_g^p||^2      (official code, default)
  cam          D = sum_p w_p ||f_q^p - f_g^p||        (paper text)
  cosine       D = 1 - cos(x_q, x_g)   on the concatenated feature x (P*C)
  euclidean    D = ||x_q - x_g||       on the concatenated feature
  with w_p = a_q^p a_g^p / sum_j a_q^j a_g^j.

k-reciprocal re-ranking (`rerank=True`, rerank.py) is defined on squared
Euclidean distances: Zhong et al. square the Euclidean distance before
re-ranking (what torchreid and fast-reid pass it: README "Re-ranking, query
expansion, verification, and what the peers compute"). So re-ranking always takes
the squared-Euclidean member of the chosen distance (RERANK_INPUT), and the
lambda-weighted original distance in its result is that one too:

  cam_squared  -> cam_squared          (a weighted sum of squared L2 distances)
  cam          -> cam_squared          (the same weights, squared L2 per branch)
  cosine       -> cosine               (1 - cos = |x_q/|x_q| - x_g/|x_g||^2 / 2)
  euclidean    -> ||x_q - x_g||^2

`cam_squared` is one large GEMM: expanding the square,
  sum_p a_q^p a_g^p ||f_q^p - f_g^p||^2
      = sum_p a_q^p a_g^p (|f_q^p|^2 + |f_g^p|^2) - 2 [a_q f_q] . [a_g f_g]
where [a f] is the area-scaled concatenated feature (P*C); the norm terms and
the denominator a_q . a_g are GEMMs with P columns. This holds for any features
(not only L2-normalised ones), so no (Q, G, P) tensor is ever built.

Ranking (docs/design.md section 5) without sorting: a query's AP, CMC and INP depend only
on the ranks of its true matches. With the stable tie rule, gallery item k is
ahead of item j iff (d_k, k) < (d_j, j) lexicographically, so the rank of a true
match j among the kept items is

  #{k : (d_k, k) < (d_j, j)}  -  #{junk k : (d_k, k) < (d_j, j)}.

Both true matches and junk have the query's id, so per query only the M
gallery items sharing its id are needed (an index table built on the host);
the first count is one compare-and-sum over the gallery row per same-id item
(M passes over the (query_block, G) block, a fraction of the distance GEMM's
time: scripts/bench_eval.py), the rest is M x M.
The device returns these integer ranks; AP, INP and CMC are ratios of integers,
finished on the host in float64 (`_finish_ranks`), so they equal
`reference.rank_metrics` (and fast-reid's float64 sums) on the same distances, ties
included, to float64 rounding on any machine. Queries are processed in order of M so
each block pads M little.

Memory: the gallery (prepared features) lives on the device, sharded over the
mesh along the gallery axis; per query block only a (query_block, G) distance
block exists, never the full (Q, G) matrix (unless asked for).
"""

from collections.abc import Sequence
import functools
import os
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import jax.numpy as jnp
import numpy as np
import tqdm

from musp_jax.retrieval import saved_features
from musp_jax.retrieval.saved_features import Features
from musp_jax.runtime import process

DISTANCES = ("cam_squared", "cam", "cosine", "euclidean")
# The distance k-reciprocal re-ranking is computed from (module docstring).
RERANK_INPUT = {"cam_squared": "cam_squared", "cam": "cam_squared",
                "cosine": "cosine", "euclidean": "squared_euclidean"}
Precision = jax.lax.Precision


# --------------------------------------------------------------------------
# Distances.


def _check_distance(distance: str) -> None:
  if distance not in DISTANCES:
    raise ValueError(f"distance={distance!r}; expected one of {DISTANCES}")


def _prepare(feats_NxPxC, areas_NxP, distance: str) -> tuple[jax.Array, ...]:
  """Per-item arrays that make the pairwise distance a few GEMMs."""
  feats_NxPxC = feats_NxPxC.astype(jnp.float32)
  areas_NxP = areas_NxP.astype(jnp.float32)
  n = feats_NxPxC.shape[0]
  sq_NxP = jnp.sum(feats_NxPxC * feats_NxPxC, axis=-1)
  if distance == "cam_squared":
    scaled_NxD = (feats_NxPxC * areas_NxP[..., None]).reshape(n, -1)
    return scaled_NxD, areas_NxP, areas_NxP * sq_NxP
  if distance == "cam":
    return feats_NxPxC, areas_NxP, sq_NxP
  flat_NxD = feats_NxPxC.reshape(n, -1)
  if distance == "cosine":
    norm = jnp.sqrt(jnp.sum(flat_NxD * flat_NxD, axis=-1, keepdims=True))
    return (flat_NxD / jnp.maximum(norm, 1e-12),)
  return flat_NxD, jnp.sum(sq_NxP, axis=-1)  # euclidean, squared_euclidean


def _pair(q, g, distance: str, precision) -> jax.Array:
  """(Nq, Ng) distances between two prepared sets."""
  def dot(a, b_T):  # a @ b_T.T, written so no transposed copy is made
    return jax.lax.dot_general(a, b_T, (((1,), (1,)), ((), ())),
                               precision=precision)
  if distance == "cam_squared":
    q_scaled, q_a, q_asq = q
    g_scaled, g_a, g_asq = g
    # sum_p a_q a_g (|f_q|^2 + |f_g|^2): one GEMM over [a_q|f_q|^2, a_q].
    norms = dot(jnp.concatenate([q_asq, q_a], -1),
                jnp.concatenate([g_a, g_asq], -1))
    cross = dot(q_scaled, g_scaled)
    den = dot(q_a, g_a)
    # Clamp: cancellation can give tiny negatives for near-identical items.
    return jnp.maximum(norms - 2.0 * cross, 0.0) / den
  if distance == "cam":
    q_f, q_a, q_sq = q
    g_f, g_a, g_sq = g
    num = 0.0
    for p in range(q_f.shape[1]):  # P is small; one (Nq, Ng) temporary a time
      d2 = q_sq[:, p, None] + g_sq[None, :, p] - 2.0 * dot(q_f[:, p], g_f[:, p])
      num = num + q_a[:, p, None] * g_a[None, :, p] * jnp.sqrt(jnp.maximum(d2, 0.0))
    return num / dot(q_a, g_a)
  if distance == "cosine":
    return 1.0 - dot(q[0], g[0])
  d2 = jnp.maximum(q[1][:, None] + g[1][None, :] - 2.0 * dot(q[0], g[0]), 0.0)
  return d2 if distance == "squared_euclidean" else jnp.sqrt(d2)


@functools.partial(jax.jit, static_argnames=("distance", "precision"))
def pairwise_distance(q_feats, q_areas, g_feats, g_areas, *,
                      distance: str = "cam_squared",
                      precision: Precision = Precision.HIGHEST) -> jax.Array:
  """(Nq, Ng) distances of one block; feats (N, P, C), areas (N, P)."""
  _check_distance(distance)
  return _pair(_prepare(q_feats, q_areas, distance),
               _prepare(g_feats, g_areas, distance), distance, precision)


# --------------------------------------------------------------------------
# Exact ranking of a (Qb, G) distance block.


def _block_stats(dist_QxG, g_valid_G, idx_QxM, pos_QxM, junk_QxM):
  """Per query, the 0-based rank of each true match among kept items (int32).

  idx_QxM: gallery indices of the items sharing the query's id (padding slots have
  pos = junk = False). Slots that are not true matches hold -1. AP, INP and CMC
  follow from these integers on the host (`_finish_ranks`).
  """
  num_g = dist_QxG.shape[1]
  dist_QxG = jnp.where(g_valid_G[None, :], dist_QxG, jnp.inf)
  d_QxM = jnp.take_along_axis(dist_QxG, idx_QxM, axis=1)
  g_index = jnp.arange(num_g, dtype=jnp.int32)

  # Items ahead of same-id item j in the stable order, (d_k, k) < (d_j, j): those
  # before j with d_k <= d_j and those after it with d_k < d_j. One compare-and-count
  # over the gallery row per same-id slot, in a loop: XLA's CPU backend runs the
  # (Q, M, G) broadcast form of the same sums 3-4x slower than M row reductions.
  def count_ahead(m, ahead_QxM):
    d_j = jax.lax.dynamic_slice_in_dim(d_QxM, m, 1, axis=1)
    before_QxG = g_index[None, :] < jax.lax.dynamic_slice_in_dim(idx_QxM, m, 1, axis=1)
    ahead_Q = jnp.sum(jnp.where(before_QxG, dist_QxG <= d_j, dist_QxG < d_j), axis=-1,
                      dtype=jnp.int32)
    return jax.lax.dynamic_update_slice_in_dim(ahead_QxM, ahead_Q[:, None], m, axis=1)

  ahead_QxM = jax.lax.fori_loop(0, idx_QxM.shape[1], count_ahead,
                                jnp.zeros(idx_QxM.shape, jnp.int32))
  # Junk among the same-id items ahead of each: s' ahead of s.
  d_s, d_t = d_QxM[:, None, :], d_QxM[:, :, None]
  i_s, i_t = idx_QxM[:, None, :], idx_QxM[:, :, None]
  ahead_QxMxM = (d_s < d_t) | ((d_s == d_t) & (i_s < i_t))
  junk_ahead = jnp.sum(ahead_QxMxM & junk_QxM[:, None, :], -1, dtype=jnp.int32)
  return jnp.where(pos_QxM, ahead_QxM - junk_ahead, -1)


def _finish_ranks(rank_QxM: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(AP, first-hit rank, INP) per query from its true matches' ranks, in float64.

  With r_0 < r_1 < ... the true matches' 0-based ranks, the k-th of them sits where
  k + 1 true matches are within the top r_k + 1, so AP = mean_k (k + 1) / (r_k + 1)
  and INP = (number of true matches) / (r_last + 1): ratios of integers, summed in
  float64 as fast-reid's eval_market1501 sums them. Every row has a true match.
  """
  rank_QxM = np.asarray(rank_QxM, np.int64)
  num_pos = np.sum(rank_QxM >= 0, axis=1)
  # Sorted ascending with the empty (-1) slots last: the k-th column is r_k.
  ranks = np.sort(np.where(rank_QxM >= 0, rank_QxM, np.iinfo(np.int64).max), axis=1)
  k = np.arange(ranks.shape[1])
  precision = np.where(k[None, :] < num_pos[:, None], (k + 1.0) / (ranks + 1.0), 0.0)
  ap = np.sum(precision, axis=1) / num_pos
  last = ranks[np.arange(len(ranks)), num_pos - 1]
  return ap, ranks[:, 0], num_pos / (last + 1.0)


@functools.partial(jax.jit, static_argnames=("distance", "precision"))
def _features_block(q_feats, q_areas, g_prep, g_valid, idx, pos, junk, *,
                    distance, precision):
  dist = _pair(_prepare(q_feats, q_areas, distance), g_prep, distance, precision)
  return _block_stats(dist, g_valid, idx, pos, junk)


@functools.partial(jax.jit, static_argnames=("distance", "precision"))
def _query_distance(q_feats, q_areas, g_prep, *, distance, precision):
  return _pair(_prepare(q_feats, q_areas, distance), g_prep, distance, precision)


@jax.jit
def _distmat_block(dist, g_valid, idx, pos, junk):
  return _block_stats(dist, g_valid, idx, pos, junk)


# --------------------------------------------------------------------------
# Host-side bookkeeping: same-id tables, blocks, sharding, accumulation.


def _shardings(mesh: Mesh) -> tuple[NamedSharding, NamedSharding, NamedSharding]:
  axes = tuple(mesh.axis_names)
  return (NamedSharding(mesh, PartitionSpec(axes)),  # gallery rows
          NamedSharding(mesh, PartitionSpec(None, axes)),  # distance columns
          NamedSharding(mesh, PartitionSpec()))  # replicated


def _put(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])


def _pad_rows(x: np.ndarray, n: int, value=0) -> np.ndarray:
  if x.shape[0] == n:
    return x
  pad = np.full((n - x.shape[0],) + x.shape[1:], value, dtype=x.dtype)
  return np.concatenate([x, pad])


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


class _SameIdTable:
  """For each query, the gallery items with its id, flagged true match / junk."""

  def __init__(self, q_ids, g_ids, q_cams, g_cams, remove_junk: bool):
    self.q_ids, self.q_cams = np.asarray(q_ids), np.asarray(q_cams)
    self.g_cams = np.asarray(g_cams)
    self.remove_junk = remove_junk
    g_ids = np.asarray(g_ids)
    self.order = np.argsort(g_ids, kind="stable")
    sorted_ids = g_ids[self.order]
    self.start = np.searchsorted(sorted_ids, self.q_ids, side="left")
    self.count = np.searchsorted(sorted_ids, self.q_ids, side="right") - self.start
    num_pos = np.zeros(len(self.q_ids), np.int64)
    for lo in range(0, len(self.q_ids), 4096):  # bounded host memory
      _, pos, _ = self.table(np.arange(lo, min(lo + 4096, len(self.q_ids))))
      num_pos[lo:lo + 4096] = pos.sum(-1)
    self.num_pos = num_pos

  def table(self, queries: np.ndarray, width: int | None = None):
    count = self.count[queries]
    width = max(int(count.max(initial=0)), 1) if width is None else width
    slot = np.arange(width)
    valid = slot[None, :] < count[:, None]
    where = np.where(valid, self.start[queries, None] + slot[None, :], 0)
    idx = np.where(valid, self.order[np.minimum(where, len(self.order) - 1)], 0)
    junk = valid & self.remove_junk & (
        self.g_cams[idx] == self.q_cams[queries, None])
    return idx.astype(np.int32), valid & ~junk, junk


def _query_blocks(table: _SameIdTable, query_block: int):
  """Valid queries sorted by same-id count, in blocks with a power-of-2 width."""
  valid = np.flatnonzero(table.num_pos > 0)
  valid = valid[np.argsort(table.count[valid], kind="stable")]
  for lo in range(0, len(valid), query_block):
    queries = valid[lo:lo + query_block]
    width = 1 << int(np.ceil(np.log2(max(table.count[queries].max(), 1))))
    yield queries, width


class _Accumulator:
  """Sums of the per-query results, and the per-query results themselves."""

  def __init__(self, max_rank: int, num_queries: int):
    self.max_rank = max_rank
    self.ap = self.inp = 0.0
    self.first_hist = np.zeros(max_rank + 1, np.int64)
    self.n = 0
    # Queries never added (no true match) keep NaN / -1.
    self.all_ap = np.full(num_queries, np.nan)
    self.all_inp = np.full(num_queries, np.nan)
    self.first_hit = np.full(num_queries, -1, np.int64)

  def add(self, queries: np.ndarray, rank_QxM: jax.Array):
    """Adds a block's queries from `_block_stats`' ranks (padding rows after them)."""
    n = len(queries)
    ap, first, inp = _finish_ranks(np.asarray(rank_QxM.addressable_shards[0].data)[:n])
    self.all_ap[queries], self.all_inp[queries] = ap, inp
    self.first_hit[queries] = first
    self.ap += float(np.sum(ap, dtype=np.float64))
    self.inp += float(np.sum(inp, dtype=np.float64))
    self.first_hist += np.bincount(np.minimum(first, self.max_rank),
                                   minlength=self.max_rank + 1)
    self.n += n

  def result(self, per_query: bool) -> dict[str, Any]:
    if self.n == 0:
      raise ValueError("evaluate: no query has a true match in the gallery "
                       "(after junk removal); nothing to evaluate")
    result = {"mAP": self.ap / self.n,
              "cmc": np.cumsum(self.first_hist[:self.max_rank]) / self.n,
              "mINP": self.inp / self.n,
              "num_valid_queries": self.n}
    if per_query:
      result["per_query"] = {"AP": self.all_ap, "INP": self.all_inp,
                             "first_hit": self.first_hit}
    return result


def _effective_block(query_block: int, table: "_SameIdTable") -> int:
  """No bigger than needed: small sets should not pay for padding."""
  return max(1, min(query_block, _round_up(int(np.sum(table.num_pos > 0)), 8)))


def _check_block(query_block: int) -> None:
  if query_block < 1:
    raise ValueError(f"query_block={query_block}; expected >= 1")


def _rank_in_blocks(labels, block_stats, *, max_rank: int, remove_junk: bool,
                    query_block: int, mesh: Mesh, per_query: bool,
                    progress: str | None = None) -> dict[str, Any]:
  """The one loop over query blocks, for distances given or computed on the device.

  labels: (q_ids, g_ids, q_cams, g_cams). `block_stats(queries, block_rows, idx, pos,
  junk)` returns the ranks of the true matches of the `queries` (padded to
  `block_rows`; `_block_stats`) from their same-id tables (`_SameIdTable.table`, on
  the device).
  progress: a progress bar over the blocks, with this description.
  """
  _check_block(query_block)
  _, _, repl = _shardings(mesh)
  table = _SameIdTable(*labels, remove_junk)
  query_block = _effective_block(query_block, table)
  acc = _Accumulator(max_rank, len(table.q_ids))
  blocks = _query_blocks(table, query_block)
  if progress:
    blocks = tqdm.tqdm(list(blocks), desc=progress, unit="block", mininterval=5.0)
  for queries, width in blocks:
    idx, pos, junk = (_put(_pad_rows(x, query_block), repl)
                      for x in table.table(queries, width))
    acc.add(queries, block_stats(queries, query_block, idx, pos, junk))
  return acc.result(per_query)


# --------------------------------------------------------------------------
# Public entry points.


def rank_distmat(distmat: np.ndarray, q_ids, g_ids, q_cams, g_cams, *,
                 max_rank: int = 50, remove_junk: bool = True,
                 query_block: int = 1024, mesh: Mesh | None = None,
                 per_query: bool = False) -> dict[str, Any]:
  """`reference.rank_metrics` computed on the device, query block by block.

  With `per_query`, also "per_query": {"AP", "INP", "first_hit"}, as
  `reference.rank_metrics` returns them (NaN / -1 for queries without a true
  match).
  """
  distmat = np.asarray(distmat, np.float32)
  if distmat.ndim != 2:
    raise ValueError(f"rank_distmat: distmat must be 2-D, got {distmat.shape}")
  mesh = mesh or process.make_mesh()
  rows, cols, _ = _shardings(mesh)
  num_g = distmat.shape[1]
  g_pad = _round_up(num_g, mesh.size)
  g_valid = _put(np.arange(g_pad) < num_g, rows)

  def block_stats(queries, block_rows, idx, pos, junk):
    block = np.zeros((block_rows, g_pad), np.float32)
    block[:len(queries), :num_g] = distmat[queries]
    return _distmat_block(_put(block, cols), g_valid, idx, pos, junk)

  return _rank_in_blocks((q_ids, g_ids, q_cams, g_cams), block_stats,
                         max_rank=max_rank, remove_junk=remove_junk,
                         query_block=query_block, mesh=mesh, per_query=per_query)


def _prepare_gallery(gallery: Features, distance: str, mesh: Mesh):
  rows, _, _ = _shardings(mesh)
  num_g = len(gallery)
  g_pad = _round_up(num_g, mesh.size)
  # Padding rows get unit areas (a finite denominator) and are masked out.
  # copy=False: a float32 gallery (VERI-Wild large: 5 GiB) is not copied on the host.
  feats = _put(_pad_rows(gallery.feats.astype(np.float32, copy=False), g_pad), rows)
  areas = _put(_pad_rows(gallery.areas.astype(np.float32, copy=False), g_pad, 1.0), rows)
  prep = jax.jit(_prepare, static_argnums=2, out_shardings=rows)(
      feats, areas, distance)
  return prep, _put(np.arange(g_pad) < num_g, rows)


def distance_matrix(query: "Features | str | os.PathLike",
                    gallery: "Features | str | os.PathLike", *,
                    distance: str = "cam_squared", query_block: int = 1024,
                    mesh: Mesh | None = None,
                    precision: Precision = Precision.HIGHEST) -> np.ndarray:
  """The full (Q, G) matrix on the host (computed in query blocks)."""
  _check_distance(distance)
  return _distance_matrix(saved_features.as_features(query, "query"),
                          saved_features.as_features(gallery, "gallery"), distance=distance,
                          query_block=query_block, mesh=mesh or process.make_mesh(),
                          precision=precision)


def _distance_matrix(query: Features, gallery: Features, *, distance: str,
                     query_block: int, mesh: Mesh, precision) -> np.ndarray:
  _, _, repl = _shardings(mesh)
  g_prep, _ = _prepare_gallery(gallery, distance, mesh)
  out = np.empty((len(query), len(gallery)), np.float32)
  for lo in range(0, len(query), query_block):
    hi = min(lo + query_block, len(query))
    qf = _put(_pad_rows(query.feats[lo:hi].astype(np.float32, copy=False), query_block),
              repl)
    qa = _put(_pad_rows(query.areas[lo:hi].astype(np.float32, copy=False), query_block, 1.0),
              repl)
    dist = _query_distance(qf, qa, g_prep, distance=distance,
                           precision=precision)
    out[lo:hi] = np.asarray(jax.device_get(dist))[:hi - lo, :len(gallery)]
  return out


def evaluate(query: "Features | str | os.PathLike",
             gallery: "Features | str | os.PathLike", *,
             distance: str = "cam_squared", remove_junk: bool = True,
             max_rank: int = 50, query_block: int = 1024,
             rerank: bool = False, rerank_k1: int = 20, rerank_k2: int = 6,
             rerank_lambda: float = 0.3, aqe: bool = False, qe_times: int = 1,
             qe_k: int = 5, qe_alpha: float = 3.0, roc: bool = False,
             roc_target_fpr: float = 1e-3, mesh: Mesh | None = None,
             precision: Precision = Precision.HIGHEST,
             return_distmat: bool = False,
             per_query: bool = False) -> dict[str, Any]:
  """Retrieval metrics of query vs gallery features, streamed on the device.

  Args:
    query, gallery: `Features` or paths of saved .npz features.
    distance: one of DISTANCES.
    remove_junk: drop gallery items sharing the query's id and camera.
    max_rank: CMC length.
    query_block: queries per device step; the device holds one
      (query_block, G) distance block.
    rerank: k-reciprocal re-ranking (rerank.py, sparse and streamed),
      computed from RERANK_INPUT[distance], the squared-Euclidean member of
      `distance` (module docstring); the result names it "rerank_input".
    aqe, qe_times, qe_k, qe_alpha: alpha query expansion of both sets first
      (query_expansion.py).
    roc: also return "roc", the verification figures over all query-gallery
      pairs (verification.py), with the threshold for roc_target_fpr.
    mesh: devices to shard the gallery over (default: all devices).
    precision: matmul precision of the distance.
    return_distmat: also return the full (Q, G) matrix as "distmat" (after
      re-ranking, if any).
    per_query: also return "per_query": {"AP" (Q,), "INP" (Q,), "first_hit"
      (Q,)} in query order; first_hit is the 0-based rank of the first true
      match after junk removal; a query without a true match has NaN AP and
      INP and first_hit -1 (it is not counted in the means).

  Returns:
    {"mAP", "cmc" (max_rank,), "mINP", "num_valid_queries"} (+ "distmat",
    "per_query", "rerank_input", "roc").
  """
  _check_distance(distance)
  query = saved_features.as_features(query, "query")
  gallery = saved_features.as_features(gallery, "gallery")
  if query.feats.shape[1:] != gallery.feats.shape[1:]:
    raise ValueError(f"evaluate: query features {query.feats.shape[1:]} and "
                     f"gallery features {gallery.feats.shape[1:]} differ (P, C)")
  mesh = mesh or process.make_mesh()
  _check_block(query_block)
  labels = (query.ids, gallery.ids, query.cams, gallery.cams)
  options = dict(max_rank=max_rank, remove_junk=remove_junk,
                 query_block=query_block, mesh=mesh, per_query=per_query)
  dm = functools.partial(_distance_matrix, query_block=query_block, mesh=mesh,
                         precision=precision)
  # These build on this module, so they are imported here, not at the top.
  from musp_jax.retrieval import verification
  if aqe:
    from musp_jax.retrieval import query_expansion
    query, gallery = query_expansion.expand(query, gallery, distance=distance,
                                            qe_times=qe_times, qe_k=qe_k,
                                            alpha=qe_alpha)
  if rerank:
    from musp_jax.retrieval import rerank as rerank_lib
    result = rerank_lib.evaluate(
        query, gallery, distance=RERANK_INPUT[distance], k1=rerank_k1, k2=rerank_k2,
        lambda_value=rerank_lambda, return_distmat=return_distmat, roc=roc,
        roc_target_fpr=roc_target_fpr, **{k: v for k, v in options.items()
                                          if k != "mesh"})
    result["rerank_input"] = RERANK_INPUT[distance]
    return result
  if return_distmat:
    distmat = dm(query, gallery, distance=distance)
    result = rank_distmat(distmat, *labels, **options)
    result["distmat"] = distmat
    if roc:
      result["roc"] = verification.roc(verification.matrix_blocks(distmat), *labels,
                                       remove_junk=remove_junk,
                                       target_fpr=roc_target_fpr)
    return result

  _, _, repl = _shardings(mesh)
  g_prep, g_valid = _prepare_gallery(gallery, distance, mesh)

  def block_stats(queries, block_rows, idx, pos, junk):
    qf = _put(_pad_rows(query.feats[queries].astype(np.float32, copy=False), block_rows),
              repl)
    qa = _put(_pad_rows(query.areas[queries].astype(np.float32, copy=False), block_rows,
                        1.0),
              repl)
    return _features_block(qf, qa, g_prep, g_valid, idx, pos, junk, distance=distance,
                           precision=precision)

  result = _rank_in_blocks(labels, block_stats, **options)
  if roc:
    result["roc"] = verification.roc(
        verification.feature_blocks(query, g_prep, g_valid, distance=distance,
                                    precision=precision, mesh=mesh),
        *labels, remove_junk=remove_junk, target_fpr=roc_target_fpr)
  return result


def result_row(result: dict[str, Any], ranks: Sequence[int] = (1, 5, 10)
               ) -> dict[str, float]:
  """A flat row of scalars: mAP, CMC@k, mINP, num_queries (valid queries)."""
  row = {"mAP": float(result["mAP"])}
  for k in ranks:
    row[f"CMC@{k}"] = float(result["cmc"][k - 1])
  row["mINP"] = float(result["mINP"])
  row["num_queries"] = int(result["num_valid_queries"])
  return row
