"""Exact k nearest neighbours of every item among all items, streamed in block pairs.

k-reciprocal re-ranking (musp_jax.retrieval.rerank) and alpha query expansion
(musp_jax.retrieval.query_expansion) both need, for each of the n = Q + G items of the
joint query + gallery set, its k nearest items among all n (itself included),
in the stable order: ascending score, ties by item index (as a stable argsort of
the item's full row would give). This module computes exactly that without ever
holding an (n, n) matrix or a second copy of the features:

- The items stay where the caller keeps them (host memory: the saved features);
  blocks of `block` items are copied to the device as they are needed.
- The score matrix is symmetric in exact arithmetic, so only the block pairs
  (a, b) with a <= b are computed: one (block, block) GEMM serves the neighbour
  lists of the items of block a (its rows) and of block b (its columns). That
  halves the work of the all-pairs search.
- Each item keeps a running list of its k best (score, index) pairs, merged with
  every new block of candidates by a top-k over [list, block]. The order of the
  pairs, (0,0), (0,1), ..., (0,m), (1,1), (1,2), ..., makes the candidate
  blocks of every item arrive in increasing index order (item block b receives
  blocks 0..b-1 as columns of the pairs (a, b), a < b, then b, b+1, ... as rows
  of (b, b'), b' >= b). The list therefore always holds lower indices than the
  new block, and jax.lax.top_k, which puts the lower position first among equal
  values, keeps ties in index order: the result equals a stable argsort of the
  full row, ties included.
- The maximum of every item's column (over all n items) is accumulated in the
  same pass: re-ranking normalises by it.

The score of a pair is computed once per unordered pair, with the lower block in
the row role, so an item's list may hold (i, j) scores computed as s(j, i):
they differ from s(i, j) by float rounding only.

Work: n^2 / 2 score evaluations (a GEMM of P*C columns for the retrieval
distances), plus two top-k merges of (block, block + k) per block pair.
Memory: the running lists (n x k) and a few (block x P*C) and (block x block)
temporaries on the device, besides the caller's features.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

DEFAULT_BLOCK = 2048


@dataclasses.dataclass(frozen=True)
class Neighbours:
  """Each item's k nearest items (itself included), nearest first."""
  index: np.ndarray  # (n, k) int32
  score: np.ndarray  # (n, k) float32, the pair scores, ascending
  column_max: np.ndarray  # (n,) float32, max over all n items of the pair score

  def __len__(self) -> int:
    return self.index.shape[0]


class JointItems:
  """Query and gallery (feats (N, P, C), areas (N, P)) as one indexed set, not copied.

  Item i < Q is query i, item Q + j is gallery item j (the order re-ranking uses).
  """

  def __init__(self, parts: Sequence[tuple[np.ndarray, np.ndarray]]):
    self.parts = [(np.asarray(f), np.asarray(a)) for f, a in parts]
    shapes = {f.shape[1:] for f, _ in self.parts}
    if len(shapes) != 1:
      raise ValueError(f"neighbours: feature shapes {sorted(shapes)} differ (P, C)")
    self.starts = np.cumsum([0] + [len(f) for f, _ in self.parts])
    self.item_shape = shapes.pop()

  def __len__(self) -> int:
    return int(self.starts[-1])

  def rows(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 copies of the features and areas of items `index` (sorted or not)."""
    index = np.asarray(index)
    feats = np.empty((len(index),) + self.item_shape, np.float32)
    areas = np.empty((len(index), self.item_shape[0]), np.float32)
    part = np.searchsorted(self.starts, index, side="right") - 1
    for p, (f, a) in enumerate(self.parts):
      where = np.flatnonzero(part == p)
      if where.size:
        local = index[where] - self.starts[p]
        feats[where] = f[local]
        areas[where] = a[local]
    return feats, areas

  def block(self, lo: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Items lo .. lo+size-1 padded to `size` (zero features, unit areas) and a mask."""
    hi = min(lo + size, len(self))
    feats = np.zeros((size,) + self.item_shape, np.float32)
    areas = np.ones((size, self.item_shape[0]), np.float32)
    for p, (f, a) in enumerate(self.parts):
      s, e = max(lo, self.starts[p]), min(hi, self.starts[p + 1])
      if s < e:
        feats[s - lo:e - lo] = f[s - self.starts[p]:e - self.starts[p]]
        areas[s - lo:e - lo] = a[s - self.starts[p]:e - self.starts[p]]
    return feats, areas, np.arange(size) < hi - lo


# A score: prepare(feats_NxPxC, areas_NxP) -> per-item arrays, and
# pair(prepared_a, prepared_b) -> (Na, Nb) scores, smaller = nearer. Both are
# module-level functions (static arguments of the jitted steps).
Prepare = Callable[..., tuple[jax.Array, ...]]
Pair = Callable[..., jax.Array]


def _merge(best_v, best_i, new_v, lo_new, k: int):
  """The k smallest of [best, new block] by value, earlier positions first among ties.

  The block's own k smallest first (stable), then those 2k: 2.5x faster than one
  top-k over [best, block] on XLA's CPU backend.
  """
  neg, pos = jax.lax.top_k(-new_v, min(k, new_v.shape[1]))
  values = jnp.concatenate([best_v, -neg], axis=1)
  index = jnp.concatenate([best_i, lo_new + pos.astype(jnp.int32)], axis=1)
  neg, pos = jax.lax.top_k(-values, k)
  return -neg, jnp.take_along_axis(index, pos, axis=1)


@functools.partial(jax.jit, static_argnames=("prepare",))
def prepare_block(feats, areas, *, prepare):
  """`prepare` as a computation of its own: prepared inside the computation of the
  GEMM that follows (a per-branch norm, say), XLA's CPU backend ran that GEMM 4x
  slower."""
  return prepare(feats, areas)


@functools.partial(jax.jit, static_argnames=("pair", "k", "diagonal"))
def _pair_step(pa, va, lo_a, pb, vb, lo_b, best_a, best_b, *, pair, k: int,
               diagonal: bool):
  """Scores of block a (rows) x block b (columns), merged into both blocks' lists."""
  score = pair(pa, pb) + 0.0  # -0.0 -> +0.0, so that equal scores compare equal below
  valid = va[:, None] & vb[None, :]
  top = jnp.where(valid, score, jnp.inf)
  low = jnp.where(valid, score, -jnp.inf)
  bv, bi, bmax = best_b
  bv, bi = _merge(bv, bi, top.T, lo_a, k)
  best_b = (bv, bi, jnp.maximum(bmax, jnp.max(low, axis=0)))
  if diagonal:
    return best_b, best_b
  av, ai, amax = best_a
  av, ai = _merge(av, ai, top, lo_b, k)
  return (av, ai, jnp.maximum(amax, jnp.max(low, axis=1))), best_b


def _empty(size: int, k: int):
  return (jnp.full((size, k), jnp.inf, jnp.float32), jnp.zeros((size, k), jnp.int32),
          jnp.full((size,), -jnp.inf, jnp.float32))


def nearest(items: JointItems, k: int, *, prepare: Prepare, pair: Pair,
            block: int = DEFAULT_BLOCK, progress: bool = False,
            desc: str = "neighbours") -> Neighbours:
  """The k nearest items of every item (stable order), and every column's maximum.

  Args:
    items: the joint set.
    k: neighbours per item, itself included; 1 <= k <= len(items).
    prepare, pair: the score (see `Prepare`, `Pair`).
    block: items per block (one (block, block) score matrix at a time).
    progress: show a progress bar with the time left.
  """
  n = len(items)
  if not 1 <= k <= n:
    raise ValueError(f"neighbours: k={k}; expected 1..{n} (the number of items)")
  if block < 1:
    raise ValueError(f"neighbours: block={block}; expected >= 1")
  block = min(block, -(-n // 8) * 8)  # small sets: no padding to a large block
  num_blocks = -(-n // block)
  lists = [_empty(block, k) for _ in range(num_blocks)]
  step = functools.partial(_pair_step, pair=pair, k=k)

  def prepared(b: int):
    feats, areas, valid = items.block(b * block, block)
    return prepare_block(feats, areas, prepare=prepare), jnp.asarray(valid)

  total = num_blocks * (num_blocks + 1) // 2
  with tqdm.tqdm(total=total, desc=desc, unit="block pair", disable=not progress,
                 mininterval=5.0) as bar:
    previous = None
    for a in range(num_blocks):
      pa, va = prepared(a)
      lo_a = jnp.int32(a * block)
      lists[a], _ = step(pa, va, lo_a, pa, va, lo_a, lists[a], lists[a], diagonal=True)
      bar.update(1)
      for b in range(a + 1, num_blocks):
        pb, vb = prepared(b)
        lists[a], lists[b] = step(pa, va, lo_a, pb, vb, jnp.int32(b * block),
                                  lists[a], lists[b], diagonal=False)
        # At most two steps in flight: dispatch runs ahead of the device otherwise,
        # and every queued step holds its block (the memory of the whole set).
        jax.block_until_ready(previous)
        previous = lists[b]
        bar.update(1)
  value = np.concatenate([np.asarray(v) for v, _, _ in lists])[:n]
  index = np.concatenate([np.asarray(i) for _, i, _ in lists])[:n]
  column_max = np.concatenate([np.asarray(m) for _, _, m in lists])[:n]
  return Neighbours(index, value, column_max)


@functools.partial(jax.jit, static_argnames=("prepare", "pair"))
def _pairwise_rows(fa, aa, fb, ab, *, prepare, pair):
  """score(a_t, b_t) for each row t of two equally long blocks."""
  def one(f1, a1, f2, a2):
    return pair(prepare(f1[None], a1[None]), prepare(f2[None], a2[None]))[0, 0]
  return jax.vmap(one)(fa, aa, fb, ab)


def pair_scores(items: JointItems, rows_i: np.ndarray, cols_j: np.ndarray, *,
                prepare: Prepare, pair: Pair, chunk: int = 1024) -> np.ndarray:
  """score(i, j) for the pairs (rows_i[t], cols_j[t]), in chunks of `chunk` pairs."""
  out = np.empty(len(rows_i), np.float32)
  size = min(chunk, max(8, -(-len(rows_i) // 8) * 8))
  for lo in range(0, len(rows_i), size):
    hi = min(lo + size, len(rows_i))
    idx_i = np.zeros(size, np.int64)
    idx_j = np.zeros(size, np.int64)
    idx_i[:hi - lo], idx_j[:hi - lo] = rows_i[lo:hi], cols_j[lo:hi]
    fa, aa = items.rows(idx_i)
    fb, ab = items.rows(idx_j)
    out[lo:hi] = np.asarray(_pairwise_rows(fa, aa, fb, ab, prepare=prepare,
                                           pair=pair))[:hi - lo]
  return out
