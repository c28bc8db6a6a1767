"""Verification ("same vehicle or not?") over all query-gallery pairs: exact ROC figures.

Pairs: every query with every gallery item; a pair of the same id is positive,
of different ids negative; with junk removal the same-id same-camera pairs are
left out (as fast-reid's `evaluate_roc`). A pair is accepted when its distance
is below a threshold. For a target false-positive rate f, with N_neg negatives
sorted n_(1) <= n_(2) <= ...:

  threshold(f) = n_(k+1),  k = floor(f N_neg)   (accept D < threshold)
  FPR          = #{negatives < threshold} / N_neg  <= f
  TPR(f)       = #{positives < threshold} / N_pos,

the largest TPR of any threshold whose FPR is at most f (threshold(f) = inf when
k = N_neg). The equal error rate is EER = min over t of max(FPR(t), FNR(t)) with
accept D <= t, FNR = 1 - TPR, and its threshold the smallest t attaining it
(only positive distances need be tried: between two of them FNR is constant
and FPR grows).

Streamed, exact, in bounded memory: Q x G distances are never held. The
positives (one per same-id pair, like the ranking's same-id table) are kept.
The negatives are counted, not kept: a float32 x >= 0 is ordered as its bit
pattern, and any float32 as the key k(x) = bits ^ (sign ? 0xFFFFFFFF :
0x80000000) (an unsigned integer). Pass 1 counts the negatives by the top 16
bits of k (65,536 bins, about 0.8% of a distance wide); that places every
order statistic n_(k+1) and every count #{negatives <= p} in one bin. Pass 2
counts, within the few bins that matter (those of the thresholds and of the
positives that could attain the EER given pass 1's bounds), the negatives by
the low 16 bits: exact keys, so exact values and counts. Each pass recomputes
the distance blocks (one GEMM pass each, like the evaluation).

fast-reid's TEST.ROC (evaluation/roc.py + sklearn's roc_curve) labels the
positive pairs 0 and the negatives 1, so its "TPR@FPR" is the fraction of
negative pairs rejected at a given fraction of positive pairs rejected; and it
reads the curve point nearest the FPR, not the best one below it. The figures
here are the usual verification ones (accepted positives at accepted
negatives).
"""

from __future__ import annotations

import fractions
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from musp_jax.retrieval import ranking
from musp_jax.retrieval.saved_features import Features

FPRS = (1e-4, 1e-3, 1e-2, 1e-1)
_BINS = 1 << 16
_REFINE = 256  # bins refined per extra pass (64 MiB of counts)

# blocks(queries, rows) -> (rows, G') distances of those queries (rows padded);
# columns past G are masked by the g_valid that comes with it.
Blocks = tuple[Callable[[np.ndarray, int], jax.Array], jax.Array]


def _key(dist):
  """Unsigned keys ordered as the floats (-0.0 taken as +0.0)."""
  bits = jax.lax.bitcast_convert_type(dist + 0.0, jnp.uint32)
  flip = jnp.where(bits >> 31 == 1, jnp.uint32(0xFFFFFFFF), jnp.uint32(0x80000000))
  return bits ^ flip


def _float(key: np.ndarray) -> np.ndarray:
  key = np.asarray(key, np.uint32)
  bits = np.where(key >> 31 == 1, key ^ np.uint32(0x80000000), ~key)
  return bits.astype(np.uint32).view(np.float32)


@jax.jit
def _pass1(dist, g_valid, row_valid, q_code, g_code, idx, pos):
  negative = row_valid[:, None] & g_valid[None, :] & (g_code[None, :] != q_code[:, None])
  high = (_key(dist) >> 16).astype(jnp.int32)
  hist = jnp.zeros(_BINS, jnp.int32).at[high.reshape(-1)].add(
      negative.reshape(-1).astype(jnp.int32))
  d_pos = jnp.take_along_axis(dist, idx, axis=1)
  return hist, jnp.where(pos & row_valid[:, None], d_pos, jnp.nan)


@jax.jit
def _pass2(dist, g_valid, row_valid, q_code, g_code, bins):
  negative = row_valid[:, None] & g_valid[None, :] & (g_code[None, :] != q_code[:, None])
  key = _key(dist)
  high = (key >> 16).astype(jnp.int32)
  slot = jnp.clip(jnp.searchsorted(bins, high), 0, bins.shape[0] - 1)
  hit = negative & (bins[slot] == high)
  flat = slot * _BINS + (key & 0xFFFF).astype(jnp.int32)
  return jnp.zeros(bins.shape[0] * _BINS, jnp.int32).at[flat.reshape(-1)].add(
      hit.reshape(-1).astype(jnp.int32)).reshape(bins.shape[0], _BINS)


def feature_blocks(query: Features, g_prep, g_valid, *, distance: str,
                   precision, mesh) -> Blocks:
  """Blocks of `distance` from features, against a gallery already on the device."""
  _, _, repl = ranking._shardings(mesh)

  def blocks(queries: np.ndarray, rows: int) -> jax.Array:
    qf = ranking._put(ranking._pad_rows(query.feats[queries], rows), repl)
    qa = ranking._put(ranking._pad_rows(query.areas[queries], rows, 1.0), repl)
    return ranking._query_distance(qf, qa, g_prep, distance=distance,
                                     precision=precision)
  return blocks, g_valid


def matrix_blocks(distmat: np.ndarray) -> Blocks:
  """Blocks of a (Q, G) matrix held on the host."""
  distmat = np.asarray(distmat, np.float32)

  def blocks(queries: np.ndarray, rows: int) -> jax.Array:
    return jnp.asarray(ranking._pad_rows(distmat[queries], rows))
  return blocks, jnp.ones(distmat.shape[1], bool)


def _floor_count(fpr: float, total: int) -> int:
  """floor(fpr * total), with fpr read as the decimal it prints as (1e-3 = 1/1000)."""
  return int(fractions.Fraction(repr(float(fpr))) * total)


def roc(source: Blocks, q_ids, g_ids, q_cams, g_cams, *, remove_junk: bool = True,
        target_fpr: float = 1e-3, query_block: int = 256,
        fprs: Sequence[float] = FPRS) -> dict[str, Any]:
  """TPR at each FPR, thresholds, EER, and a binned curve for plots (module docstring).

  Returns {"num_positive", "num_negative", "tpr_at_fpr" {f: TPR},
  "threshold_at_fpr" {f: threshold}, "fpr_at_threshold" {f: achieved FPR},
  "target_fpr", "threshold", "eer", "eer_threshold", "curve" {"distance",
  "fpr", "tpr"}, "positive_distances"}; FPR keys are formatted "1e-04".
  """
  if not 0.0 < target_fpr < 1.0:
    raise ValueError(f"roc: target FPR {target_fpr!r}; expected a number in (0, 1)")
  blocks, g_valid = source
  q_ids, g_ids = np.asarray(q_ids), np.asarray(g_ids)
  _, codes = np.unique(np.concatenate([q_ids, g_ids]), return_inverse=True)
  q_code, g_code = codes[:len(q_ids)].astype(np.int32), codes[len(q_ids):].astype(np.int32)
  g_code_dev = jnp.asarray(np.pad(g_code, (0, g_valid.shape[0] - len(g_code)),
                                  constant_values=-1))
  table = ranking._SameIdTable(q_ids, g_ids, q_cams, g_cams, remove_junk)
  num_q = len(q_ids)
  rows = max(1, min(query_block, -(-num_q // 8) * 8))

  def each_block():
    for lo in range(0, num_q, rows):
      queries = np.arange(lo, min(lo + rows, num_q))
      valid = jnp.asarray(np.arange(rows) < len(queries))
      code = jnp.asarray(np.pad(q_code[queries], (0, rows - len(queries))))
      yield queries, blocks(queries, rows), valid, code

  hist = np.zeros(_BINS, np.int64)
  positives = []
  for queries, dist, valid, code in each_block():
    width = 1 << int(np.ceil(np.log2(max(int(table.count[queries].max()), 1))))
    idx, pos, _ = (jnp.asarray(ranking._pad_rows(x, rows))
                   for x in table.table(queries, width))
    h, d_pos = _pass1(dist, g_valid, valid, code, g_code_dev, idx, pos)
    hist += np.asarray(h)
    d_pos = np.asarray(d_pos)
    positives.append(d_pos[~np.isnan(d_pos)])
  pos_d = np.sort(np.concatenate(positives)).astype(np.float32)
  num_pos, num_neg = len(pos_d), int(hist.sum())
  if num_pos == 0 or num_neg == 0:
    raise ValueError(f"roc: {num_pos} positive and {num_neg} negative pairs; both "
                     "kinds are needed")
  below = np.concatenate([[0], np.cumsum(hist)])  # negatives in bins < b
  pos_key = np.asarray(_key(jnp.asarray(pos_d)))
  pos_bin = (pos_key >> 16).astype(np.int64)

  # Order statistics: rank k (0-based) of the negatives, per FPR.
  targets = {f: _floor_count(f, num_neg) for f in (*fprs, target_fpr)}
  needed = {int(np.searchsorted(below, r, side="right") - 1)
            for r in targets.values() if r < num_neg}
  # EER: candidates are the distinct positive distances u_j (accept D <= u_j).
  values = np.unique(pos_d)
  fnr = (num_pos - np.searchsorted(pos_d, values, side="right")) / num_pos
  v_bin = (np.asarray(_key(jnp.asarray(values))) >> 16).astype(np.int64)
  low_fpr, high_fpr = below[v_bin] / num_neg, below[v_bin + 1] / num_neg
  bound = min(1.0, float(np.min(np.maximum(high_fpr, fnr))))
  maybe = np.maximum(low_fpr, fnr) <= bound
  needed |= set(int(b) for b in np.unique(v_bin[maybe]))

  fine = {}  # bin -> exact counts of the negatives by their low 16 bits
  pending = sorted(needed)
  while pending:
    group, pending = np.array(pending[:_REFINE], np.int32), pending[_REFINE:]
    size = 1 << int(np.ceil(np.log2(max(len(group), 8))))  # few shapes to compile
    bins = jnp.asarray(np.pad(group, (0, size - len(group)),
                              constant_values=np.iinfo(np.int32).max))
    counts = np.zeros((size, _BINS), np.int64)
    for _, dist, valid, code in each_block():
      counts += np.asarray(_pass2(dist, g_valid, valid, code, g_code_dev, bins))
    fine.update({int(b): counts[i] for i, b in enumerate(group)})

  def count_le(v_keys: np.ndarray, strict: bool) -> np.ndarray:
    """#{negatives <= v} (or < v) for keys in refined bins."""
    out = np.empty(len(v_keys), np.int64)
    for t, key in enumerate(v_keys):
      b, low = int(key >> 16), int(key & 0xFFFF)
      out[t] = below[b] + fine[b][:low + (0 if strict else 1)].sum()
    return out

  def order_statistic(rank: int) -> float:
    b = int(np.searchsorted(below, rank, side="right") - 1)
    low = int(np.searchsorted(np.cumsum(fine[b]), rank - below[b], side="right"))
    return float(_float(np.array([(b << 16) | low], np.uint32))[0])

  def name(f: float) -> str:
    return f"{f:.0e}"

  result = {"num_positive": num_pos, "num_negative": num_neg, "tpr_at_fpr": {},
            "threshold_at_fpr": {}, "fpr_at_threshold": {}}
  for f, rank in targets.items():
    if rank >= num_neg:
      threshold, accepted = float("inf"), num_neg
    else:
      threshold = order_statistic(rank)
      accepted = int(count_le(np.asarray(_key(jnp.float32([threshold]))), True)[0])
    tpr = float(np.searchsorted(pos_d, np.float32(threshold), side="left") / num_pos)
    result["tpr_at_fpr"][name(f)] = tpr
    result["threshold_at_fpr"][name(f)] = threshold
    result["fpr_at_threshold"][name(f)] = accepted / num_neg
  result["target_fpr"] = float(target_fpr)
  result["threshold"] = result["threshold_at_fpr"][name(target_fpr)]

  exact_fpr = np.full(len(values), np.inf)
  candidates = np.flatnonzero(maybe)
  v_keys = np.asarray(_key(jnp.asarray(values)))
  exact_fpr[candidates] = count_le(v_keys[candidates], False) / num_neg
  score = np.maximum(exact_fpr, fnr)
  best = int(np.argmin(score))  # first: the smallest threshold attaining it
  if score[best] < 1.0:
    result["eer"], result["eer_threshold"] = float(score[best]), float(values[best])
  else:  # no threshold does better than accepting nothing
    result["eer"], result["eer_threshold"] = 1.0, float("-inf")

  # The curve at bin resolution (for plots): bin upper edges as thresholds.
  used = np.flatnonzero(hist)
  edges = _float(((used + 1) << 16).astype(np.uint32) - np.uint32(1))
  result["curve"] = {
      "distance": edges,
      "fpr": below[used + 1] / num_neg,
      "tpr": np.searchsorted(pos_bin, used, side="right") / num_pos}
  result["positive_distances"] = pos_d
  result["negative_histogram"] = {"distance": edges, "count": hist[used]}
  return result


def read_threshold(path: str, *, fpr: float | None = None) -> tuple[float, dict]:
  """(threshold, report) stored by `evaluate --roc --json` (its target FPR, or
  `fpr`'s); the report says the distance, model signature and modes."""
  import json
  try:
    with open(path, encoding="utf-8") as f:
      report = json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"{path}: no such file") from None
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not a JSON report ({e})") from None
  roc_report = report.get("roc") if isinstance(report, dict) else None
  if not isinstance(roc_report, dict) or "threshold_at_fpr" not in roc_report:
    raise ValueError(f"{path}: no 'roc' section; write one with "
                     "`python -m musp_jax.evaluate ... --roc --json FILE`")
  key = f"{roc_report['target_fpr'] if fpr is None else fpr:.0e}"
  if key not in roc_report["threshold_at_fpr"]:
    raise ValueError(f"{path}: no threshold for FPR {key}; it has "
                     f"{sorted(roc_report['threshold_at_fpr'])}")
  return float(roc_report["threshold_at_fpr"][key]), report
