"""k-reciprocal re-ranking (Zhong et al., CVPR 2017), sparse and streamed.

Input convention: the method is defined on squared Euclidean distances (Zhong et
al.'s `re_ranking` squares the distance it is given; see README "Re-ranking and
the peers"), and its result depends on that choice (step 3 weighs neighbours by
exp(-d), step 6 mixes d in). Pass squared distances: squared L2, cam_squared, or
1 - cos (half the squared L2 of normalised features; the scale cancels in the
normalisation below). `ranking.evaluate` does so for every `distance` through
`ranking.RERANK_INPUT`; a plain Euclidean or `cam` distance is re-ranked
through its squared counterpart.

Steps, for every item i of the joint query+gallery set (n = Q + G items), with
d(j, i) the input distance normalised by the maximum of column i:
  1. R(i, k1): the k1-reciprocal neighbours (i is among their k1+1 nearest);
  2. expand R with R(c, k1/2) of each member c when at least 2/3 of it is
     already in R;
  3. V[i] = exp(-d(i, R*)) normalised to sum 1 (zero elsewhere);
  4. local query expansion: V[i] <- mean of V over i's k2 nearest;
  5. Jaccard distance d_J(q, g) = 1 - sum min(V_q, V_g) / sum max(V_q, V_g);
  6. final = (1 - lambda) d_J + lambda d.
Nearest-neighbour lists use a stable order (ties in index order).

`KReciprocal` computes this in memory O(n k1 + nnz(V)) and never holds an
(n, n) or (Q, G) matrix:
  - steps 1-2 need only every item's k1+1 nearest and their column maxima:
    musp_jax.retrieval.neighbours' exact all-pairs search, streamed in block pairs;
  - V is sparse (its row i is non-zero on R*(i) only, a few dozen items), and
    so is the mean of k2 of its rows (step 4); both are scipy CSR matrices;
  - distances d(j, i) of the members of R*(i) outside i's k1+1 nearest (step 2
    can add some) are computed pair by pair;
  - step 5 only needs the columns where V_q and V_g are both non-zero: sum max
    = 2 - sum min (rows sum to 1), and sum min is accumulated from V_q's
    non-zero columns through an inverted index of the gallery rows (CSC);
  - step 6 is streamed one query block at a time: the block's distances are
    recomputed (a GEMM against the gallery, streamed in column blocks) and
    combined with the block's overlaps into a (query_block, G) block on the
    device, which retrieval's exact ranking consumes.
The work is dominated by the all-pairs neighbour search: (Q+G)^2 / 2 distance
evaluations, against Q x G for the evaluation itself.

`reference.k_reciprocal_rerank` is the dense form (all (n, n) matrices in numpy),
the oracle the sparse form is tested against on sets where it fits.
"""

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh
import numpy as np
from scipy import sparse

from musp_jax.retrieval import neighbours
from musp_jax.retrieval import ranking
from musp_jax.retrieval.saved_features import Features


# The distances re-ranking reads (ranking.RERANK_INPUT's values), as neighbour
# scores: one (prepare, pair) per name, made once so that jit caches them.
_SCORES = {
    name: (functools.partial(ranking._prepare, distance=name),
           functools.partial(ranking._pair, distance=name,
                             precision=ranking.Precision.HIGHEST))
    for name in sorted(set(ranking.RERANK_INPUT.values()))}


def check_parameters(k1: int, k2: int, lambda_value: float) -> None:
  """The parameters the method is defined for (k2 nearest come from the k1+1 lists)."""
  if isinstance(k1, bool) or not isinstance(k1, (int, np.integer)) or k1 < 1:
    raise ValueError(f"rerank k1={k1!r}; expected an integer >= 1")
  if (isinstance(k2, bool) or not isinstance(k2, (int, np.integer))
      or not 1 <= k2 <= k1 + 1):
    raise ValueError(f"rerank k2={k2!r}; expected an integer in 1..k1+1 = {k1 + 1}")
  if not 0.0 <= lambda_value <= 1.0:
    raise ValueError(f"rerank lambda={lambda_value!r}; expected a number in [0, 1]")


def memory_estimate(num_query: int, num_gallery: int, *, parts: int, channels: int,
                    k1: int = 20, k2: int = 6, query_block: int = 1024,
                    block: int = neighbours.DEFAULT_BLOCK) -> dict[str, int]:
  """Bytes `KReciprocal` and its evaluation hold besides the features themselves.

  "bound" counts every V row at its largest possible size ((k1+1) members, each
  adding at most round(k1/2)+1 items); "typical" at 3 (k1+1) non-zeros, more
  than measured on clustered features (scripts/bench_eval.py prints both).
  """
  n = num_query + num_gallery
  k = k1 + 1
  half = int(np.around(k1 / 2.0)) + 1
  lists = n * k * (4 + 4) * 3  # device lists, host copies, lookups
  blocks = 4 * block * parts * channels * 4 * 3 + 6 * block * block * 4
  final = 6 * min(query_block, _block_rows(num_gallery), num_query) * num_gallery * 4
  def sparse_bytes(row_nnz: int) -> int:
    # V, its k2-row mean, the mean's gallery rows as CSC: 8 bytes a non-zero each.
    return n * row_nnz * 8 * (1 + 2 * min(k2, row_nnz))
  return {"bound": lists + blocks + final + sparse_bytes(k * (1 + half)),
          "typical": lists + blocks + final + sparse_bytes(3 * k)}


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
  """concatenate([arange(s, s + c) for s, c in zip(starts, counts)])."""
  total = int(counts.sum())
  offsets = np.repeat(np.cumsum(counts) - counts, counts)
  return np.arange(total, dtype=np.int64) - offsets + np.repeat(starts, counts)


def _reciprocal_mask(index: np.ndarray, k: int, chunk: int = 4096) -> np.ndarray:
  """(n, min(k+1, K)) mask: index[i, m] is a k-reciprocal neighbour of i."""
  width = min(k + 1, index.shape[1])
  out = np.empty((len(index), width), bool)
  for lo in range(0, len(index), chunk):
    hi = min(lo + chunk, len(index))
    backward = index[index[lo:hi, :width], :width]  # (c, width, width)
    out[lo:hi] = np.any(backward == np.arange(lo, hi)[:, None, None], axis=2)
  return out


@functools.partial(jax.jit, static_argnames=("pair",))
def _final_piece(q_prep, g_prep, overlap_QxB, qmax_Q, lambda_value, *, pair):
  """Step 6 on one (query block, gallery block) piece, in the oracle's float32 ops."""
  dist_QxB = pair(q_prep, g_prep) + 0.0
  jaccard_QxB = 1.0 - overlap_QxB / (2.0 - overlap_QxB)
  return (jaccard_QxB * (1.0 - lambda_value)
          + (dist_QxB / qmax_Q[:, None]) * lambda_value)


class KReciprocal:
  """The sparse k-reciprocal encoding of a query + gallery set (module docstring).

  `block(queries, rows)` gives the re-ranked distances of those queries to the
  whole gallery, one device block at a time; equal to `reference.k_reciprocal_rerank`
  on the same distances up to float rounding (tests/test_rerank.py).
  """

  def __init__(self, query: Features, gallery: Features, *,
               distance: str = "cam_squared", k1: int = 20, k2: int = 6,
               lambda_value: float = 0.3, block: int = neighbours.DEFAULT_BLOCK,
               progress: bool = False):
    if distance not in _SCORES:
      raise ValueError(f"rerank distance={distance!r}; expected one of "
                       f"{sorted(_SCORES)} (squared distances, module docstring)")
    check_parameters(k1, k2, lambda_value)
    self.items = neighbours.JointItems([(query.feats, query.areas),
                                        (gallery.feats, gallery.areas)])
    self.num_query, self.num_gallery = len(query), len(gallery)
    self.lambda_value = float(lambda_value)
    self.score = _SCORES[distance]
    n = len(self.items)
    self.block_size = min(block, -(-self.num_gallery // 8) * 8)
    start = time.perf_counter()
    nb = neighbours.nearest(self.items, min(k1 + 1, n), prepare=self.score[0],
                            pair=self.score[1], block=block, progress=progress,
                            desc="re-ranking: neighbours")
    self.column_max = nb.column_max
    self.seconds = {"neighbours": time.perf_counter() - start}
    start = time.perf_counter()
    v = self._encoding(nb, k1)
    self.nnz_v = v.nnz
    if k2 > 1:
      rows = np.repeat(np.arange(n), k2)
      mean = sparse.csr_array((np.ones(n * k2, np.float32),
                               (rows, nb.index[:, :k2].reshape(-1))), shape=(n, n))
      v = sparse.csr_array(mean @ v)
      v.data /= np.float32(k2)
    del nb
    self.nnz_v_mean = v.nnz
    self.v_query = sparse.csr_array(v[:self.num_query])
    self.v_query.sort_indices()
    self.v_gallery = sparse.csc_array(v[self.num_query:])
    self.v_gallery.sort_indices()
    num_blocks = -(-self.num_gallery // self.block_size)
    self.gallery_valid = jnp.arange(num_blocks * self.block_size) < self.num_gallery
    self.seconds["encoding"] = time.perf_counter() - start

  def _encoding(self, nb: neighbours.Neighbours, k1: int) -> sparse.csr_array:
    """Steps 1-3: the sparse V, rows normalised to sum 1."""
    index = nb.index
    n, k = index.shape
    members = _reciprocal_mask(index, k1)  # (n, k)
    half = _reciprocal_mask(index, int(np.around(k1 / 2.0)))  # (n, h)
    h = half.shape[1]
    cols, dists, counts = [], [], np.zeros(n, np.int64)
    missing_rows, missing_cols, missing_at = [], [], []
    offset = 0
    chunk = max(1, 2**22 // (k * h * k))
    for lo in range(0, n, chunk):
      hi = min(lo + chunk, n)
      own = np.where(members[lo:hi], index[lo:hi], -1)  # (c, k)
      cand = index[index[lo:hi], :h]  # (c, k, h): each neighbour's h nearest
      cand_in = half[index[lo:hi]]  # which of those are its half-reciprocal ones
      inside = np.any(cand[..., None] == own[:, None, None, :], axis=-1)
      size = cand_in.sum(-1)
      accept = members[lo:hi] & ((cand_in & inside).sum(-1) > 2.0 / 3.0 * size)
      added = np.where(accept[..., None] & cand_in, cand, -1).reshape(hi - lo, -1)
      expanded = np.sort(np.concatenate([own, added], axis=1), axis=1)
      keep = expanded >= 0
      keep[:, 1:] &= expanded[:, 1:] != expanded[:, :-1]
      row_counts = keep.sum(1)
      row = np.repeat(np.arange(lo, hi), row_counts)
      col = expanded[keep]
      # d(col, row) from the row's nearest list where it is there.
      match = index[row] == col[:, None]
      found = match.any(1)
      dist = nb.score[row, np.argmax(match, axis=1)]
      miss = np.flatnonzero(~found)
      missing_rows.append(row[miss])
      missing_cols.append(col[miss])
      missing_at.append(offset + miss)
      cols.append(col.astype(np.int32))
      dists.append(dist)
      counts[lo:hi] = row_counts
      offset += len(col)
    cols = np.concatenate(cols)
    dists = np.concatenate(dists)
    at = np.concatenate(missing_at)
    if at.size:
      dists[at] = neighbours.pair_scores(self.items, np.concatenate(missing_cols),
                                         np.concatenate(missing_rows),
                                         prepare=self.score[0], pair=self.score[1])
    self.num_outside_lists = int(at.size)
    rows = np.repeat(np.arange(n), counts)
    weight = np.exp(-(dists.astype(np.float32) / self.column_max[rows]))
    indptr = np.concatenate([[0], np.cumsum(counts)])
    weight /= np.bincount(rows, weights=weight, minlength=n).astype(np.float32)[rows]
    return sparse.csr_array((weight, cols, indptr), shape=(n, n))

  def overlap(self, queries: np.ndarray) -> np.ndarray:
    """(len(queries), G) float32: sum_c min(V_q[c], V_g[c]) (step 5's numerator)."""
    vq, vg = self.v_query, self.v_gallery
    num_g = self.num_gallery
    out = np.empty((len(queries), num_g), np.float32)
    chunk = max(1, 2**23 // max(num_g, 1))  # bounded float64 bins
    for lo in range(0, len(queries), chunk):
      qs = np.asarray(queries[lo:lo + chunk])
      starts, ends = vq.indptr[qs], vq.indptr[qs + 1]
      local = np.repeat(np.arange(len(qs)), ends - starts)
      at = _ranges(starts, ends - starts)
      col, val = vq.indices[at], vq.data[at]
      g_starts, g_ends = vg.indptr[col], vg.indptr[col + 1]
      g_at = _ranges(g_starts, g_ends - g_starts)
      g = vg.indices[g_at]
      both = np.minimum(np.repeat(val, g_ends - g_starts), vg.data[g_at])
      bins = np.repeat(local, g_ends - g_starts).astype(np.int64) * num_g + g
      out[lo:lo + len(qs)] = np.bincount(bins, weights=both,
                                         minlength=len(qs) * num_g).reshape(len(qs), num_g)
    return out

  def block(self, queries: np.ndarray, rows: int) -> jax.Array:
    """Re-ranked distances (rows, G padded to whole blocks) of `queries`; rows past
    len(queries) repeat the first query; columns past G are padding
    (`gallery_valid`)."""
    queries = np.asarray(queries)
    padded = np.concatenate([queries, np.full(rows - len(queries), queries[0])])
    prepare, pair = self.score
    q_prep = neighbours.prepare_block(*self.items.rows(padded), prepare=prepare)
    qmax = jnp.asarray(self.column_max[padded])
    overlap = self.overlap(padded)
    pieces = []
    b = self.block_size
    for lo in range(0, self.num_gallery, b):
      gf, ga, _ = self.items.block(self.num_query + lo, b)
      piece = np.zeros((rows, b), np.float32)
      piece[:, :min(b, self.num_gallery - lo)] = overlap[:, lo:lo + b]
      # One piece in flight at a time: each queued one would hold its gallery block.
      jax.block_until_ready(pieces[-1:])
      g_prep = neighbours.prepare_block(gf, ga, prepare=prepare)
      pieces.append(_final_piece(q_prep, g_prep, jnp.asarray(piece), qmax,
                                 self.lambda_value, pair=pair))
    return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=1)

  def matrix(self, query_block: int = 256) -> np.ndarray:
    """The whole (Q, G) re-ranked matrix on the host (for sets where it fits)."""
    out = np.empty((self.num_query, self.num_gallery), np.float32)
    for lo in range(0, self.num_query, query_block):
      queries = np.arange(lo, min(lo + query_block, self.num_query))
      out[queries] = np.asarray(self.block(queries, query_block))[
          :len(queries), :self.num_gallery]
    return out


def evaluate(query: Features, gallery: Features, *,
             distance: str, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
             remove_junk: bool = True, max_rank: int = 50, query_block: int = 1024,
             per_query: bool = False, return_distmat: bool = False,
             roc: bool = False, roc_target_fpr: float = 1e-3,
             progress: bool = False) -> dict[str, Any]:
  """ranking.evaluate's result on re-ranked distances, streamed (module docstring)."""
  from musp_jax.retrieval import verification
  encoding = KReciprocal(query, gallery, distance=distance, k1=k1, k2=k2,
                         lambda_value=lambda_value, progress=progress)
  labels = (query.ids, gallery.ids, query.cams, gallery.cams)
  if return_distmat:
    distmat = encoding.matrix()
    result = ranking.rank_distmat(distmat, *labels, max_rank=max_rank,
                                    remove_junk=remove_junk, query_block=query_block,
                                    per_query=per_query)
    result["distmat"] = distmat
  else:
    start = time.perf_counter()
    result = _rank(encoding, labels, remove_junk=remove_junk, max_rank=max_rank,
                   query_block=query_block, per_query=per_query, progress=progress)
    encoding.seconds["ranking"] = time.perf_counter() - start
  n = encoding.num_query + encoding.num_gallery
  result["rerank_stats"] = {
      "seconds": dict(encoding.seconds), "v_nonzeros_per_row": encoding.nnz_v / n,
      "v_mean_nonzeros_per_row": encoding.nnz_v_mean / n,
      "pairs_outside_lists": encoding.num_outside_lists}
  if roc:
    result["roc"] = verification.roc((encoding.block, encoding.gallery_valid), *labels,
                                     remove_junk=remove_junk, target_fpr=roc_target_fpr,
                                     query_block=_block_rows(encoding.num_gallery))
  return result


def _block_rows(num_gallery: int) -> int:
  """Query rows of a re-ranked block: its (rows, G) arrays (overlaps, distances, the
  ranking's temporaries, a handful) stay near 128 MiB each."""
  return max(8, (2**27 // (4 * max(num_gallery, 1))) // 8 * 8)


def _rank(encoding: KReciprocal, labels, *, remove_junk: bool, max_rank: int,
          query_block: int, per_query: bool, progress: bool) -> dict[str, Any]:
  """ranking's exact ranking of the re-ranked blocks, one query block at a time."""

  def block_stats(queries, block_rows, idx, pos, junk):
    return ranking._distmat_block(encoding.block(queries, block_rows),
                                  encoding.gallery_valid, idx, pos, junk)

  # The encoding lives on one device, so its blocks are ranked there.
  one_device = Mesh(np.asarray(jax.devices()[:1]), ("data",),
                    axis_types=(AxisType.Auto,))
  return ranking._rank_in_blocks(
      labels, block_stats, max_rank=max_rank, remove_junk=remove_junk,
      query_block=min(query_block, _block_rows(encoding.num_gallery)), mesh=one_device,
      per_query=per_query, progress="re-ranking: ranking" if progress else None)
