"""Evaluation speed: CAM distance vs this machine's GEMM rate, vs the dense form.

    .venv/bin/python scripts/bench_eval.py            # CPU-sized shapes
    python scripts/bench_eval.py --q 10000 --g 128517 # VERI-Wild large (GPU)

Prints, all measured in this run on this machine:
  1. float32 GEMM rate (jax, HIGHEST precision) on the distance's GEMM shape;
  2. `cam_squared` block throughput as a fraction of that rate;
  3. the dense (Q, G, P) form of the official code (per-part distance
     matrices stacked, times an L1-normalised (Q, G, P) area tensor), in torch
     as that code runs it and in jax, and the speed-up over both;
  4. exact on-device ranking of the block as a share of its distance time (goal
     <= 15%), from the host vs the numpy reference, and distance + ranking
     (`evaluate`) vs the official pipeline (dense torch distance + numpy ranking);
  5. end-to-end `evaluate` on a VERI-Wild-large-shaped problem (scaled down by
     --scale unless it is 1), with the full-size time extrapolated by Q x G;
  6. alpha query expansion (`evaluate --aqe`, fast-reid's defaults) at VeRi-776's
     shape (1,678 x 11,579): its time against the plain evaluation's;
  7. sparse k-reciprocal re-ranking at VERI-Wild large's shape (10,000 x 128,517)
     times --rerank_scale, on clustered features (identities around vehicle-model
     centres): each phase's time (neighbour search, sparse encoding, streamed
     ranking), the peak memory of the process with the features in it, the sparse
     matrices' size against rerank.memory_estimate, and the time extrapolated to
     the full shape (neighbours by n^2, ranking by Q x G) when scaled;
  and the peak resident memory of each phase (VmHWM, reset between phases).
--sections picks the parts (default base,aqe,rerank; base = 1-5).

    # the real VERI-Wild-large re-ranking shape (long on 2 cores; progress and ETA shown)
    flock /work/heavy.lock .venv/bin/python scripts/bench_eval.py --sections rerank \
        --rerank_scale 1 --channels 2048
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from musp_jax.core import features
from musp_jax.retrieval import neighbours
from musp_jax.retrieval import ranking
from musp_jax.retrieval import reference
from musp_jax.retrieval import rerank
from musp_jax.retrieval import saved_features
from musp_jax.runtime import process

HIGHEST = jax.lax.Precision.HIGHEST


def _rss_reset() -> int:
  """Resets the peak-RSS counter; returns the current RSS in bytes."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
  except OSError:
    pass
  return _status("VmRSS")


def _status(key: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(key + ":"):
        return int(line.split()[1]) * 1024
  return 0


def _peak_since(base: int) -> str:
  return f"{(_status('VmHWM') - base) / 2**20:,.0f} MiB above the phase start"


def _best(fn, repeats: int, warmup: bool = True) -> float:
  if warmup:
    fn()  # compile
  times = []
  for _ in range(max(repeats, 1)):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return min(times)


def _features(rng, n, p, c, num_ids):
  feats = features.l2_normalize(rng.standard_normal((n, p, c), np.float32))
  areas = rng.uniform(0.05, 1.0, (n, p)).astype(np.float32)
  areas[:, -1] = 1.0 / max(p - 1, 1)  # the global branch's pseudo-area
  return saved_features.Features(feats, areas, rng.integers(0, num_ids, n),
                            rng.integers(0, 174, n))


def _identities(rng, num_ids, p, c, *, group_size=50, spread=0.7):
  """Identity centres around vehicle-model centres, and each identity's part profile."""
  unit = lambda x: features.l2_normalize(x.astype(np.float32, copy=False))
  groups = unit(rng.standard_normal((max(1, num_ids // group_size), p, c), np.float32))
  centres = np.empty((num_ids, p, c), np.float32)
  for lo in range(0, num_ids, 4096):
    hi = min(lo + 4096, num_ids)
    centres[lo:hi] = unit(groups[rng.integers(0, len(groups), hi - lo)] + spread / np.sqrt(c)
                          * rng.standard_normal((hi - lo, p, c), np.float32))
  return centres, rng.dirichlet(np.full(max(p - 1, 1), 4.0), num_ids).astype(np.float32)


def _images(rng, identities, ids, *, noise=1.6):
  """Images of `ids`: centre plus noise, L2-normalised per branch; areas around the
  identity's profile, the global branch's pseudo-area last. float32, written in
  chunks (no float64 copy of the features)."""
  centres, profiles = identities
  _, p, c = centres.shape
  feats = np.empty((len(ids), p, c), np.float32)
  areas = np.empty((len(ids), p), np.float32)
  for lo in range(0, len(ids), 4096):
    hi = min(lo + 4096, len(ids))
    feats[lo:hi] = features.l2_normalize(centres[ids[lo:hi]] + noise / np.sqrt(c)
                                          * rng.standard_normal((hi - lo, p, c), np.float32))
    if p > 1:
      part = rng.gamma(20.0 * profiles[ids[lo:hi]] + 0.5).astype(np.float32)
      areas[lo:hi, :-1] = part / part.sum(axis=1, keepdims=True)
    areas[lo:hi, -1] = 1.0 / max(p - 1, 1)
  return saved_features.Features(feats, areas, ids, rng.integers(0, 174, len(ids)))


def _query_gallery(rng, num_q, num_g, p, c):
  """VERI-Wild's test layout: one query per identity, the gallery ~num_g/num_q each."""
  identities = _identities(rng, num_q, p, c)
  g_ids = np.sort(np.concatenate([np.arange(num_q),
                                  rng.integers(0, num_q, max(num_g - num_q, 0))]))[:num_g]
  return _images(rng, identities, np.arange(num_q)), _images(rng, identities, g_ids)


def _aqe_section(args, rng, mesh):
  """[6] AQE at VeRi-776's shape: the whole evaluation with and without it."""
  p, c = args.parts, args.channels
  query, gallery = _query_gallery(rng, args.aqe_q, args.aqe_g, p, c)
  options = dict(query_block=args.query_block, mesh=mesh)
  warm_q, warm_g = _query_gallery(rng, 64, 2100, p, c)  # compiles the same block shapes
  ranking.evaluate(warm_q, warm_g, aqe=True, **options)
  t_plain = _best(lambda: ranking.evaluate(query, gallery, **options), 1)
  base = _rss_reset()
  t0 = time.perf_counter()
  with_aqe = ranking.evaluate(query, gallery, aqe=True, **options)
  t_aqe = time.perf_counter() - t0
  mem = _peak_since(base)
  plain = ranking.evaluate(query, gallery, **options)
  n = args.aqe_q + args.aqe_g
  print(f"[6] evaluate {args.aqe_q:,} x {args.aqe_g:,} (P={p}, C={c}): {t_plain:.2f} s; "
        f"with AQE (qe_times 1, qe_k 5, alpha 3): {t_aqe:.2f} s, +{t_aqe / t_plain - 1:.0%}"
        f" (goal < +20%); peak {mem}")
  print(f"    AQE's exact neighbour search over all {n:,} images is {n * n / 2:,.0f} "
        f"pairs, {n * n / 2 / (args.aqe_q * args.aqe_g):.1f}x the Q x G pairs of the "
        f"evaluation; mAP {plain['mAP']:.4f} -> {with_aqe['mAP']:.4f}")
  return {"aqe_plain_s": t_plain, "aqe_s": t_aqe, "aqe_overhead": t_aqe / t_plain - 1}


def _rerank_section(args, rng):
  """[7] Sparse re-ranking at VERI-Wild large's shape (times --rerank_scale)."""
  p, c, scale = args.parts, args.channels, args.rerank_scale
  nq, ng = int(round(args.rerank_q * scale)), int(round(args.rerank_g * scale))
  t0 = time.perf_counter()
  query, gallery = _query_gallery(rng, nq, ng, p, c)
  gib = 2.0**30
  feat_bytes = (query.feats.nbytes + gallery.feats.nbytes)
  print(f"[7] re-ranking {nq:,} x {ng:,} (P={p}, C={c}; k1 20, k2 6, lambda 0.3): "
        f"features {feat_bytes / gib:.2f} GiB, generated in {time.perf_counter() - t0:.0f} s")
  if args.rerank_probe_pairs:
    return _rerank_probe(args, query, gallery, feat_bytes)
  original = nearest = neighbours.nearest
  if args.rerank_lists_channels:
    # The neighbour lists from the first channels of every branch (a cheaper search);
    # the rest runs on the whole features: its time and memory at the real shape.
    def nearest(items, k, **kw):
      m = args.rerank_lists_channels
      sliced = neighbours.JointItems([(np.ascontiguousarray(f[:, :, :m]), a)
                                      for f, a in items.parts])
      return original(sliced, k, **kw)
    print(f"    neighbour lists from the first {args.rerank_lists_channels} channels of "
          "each branch; encoding and ranking on all of them")
  base = _rss_reset()
  t0 = time.perf_counter()
  neighbours.nearest = nearest
  try:
    result = rerank.evaluate(query, gallery, distance="cam_squared",
                             query_block=args.query_block, progress=True)
  finally:
    neighbours.nearest = original
  total = time.perf_counter() - t0
  peak = _status("VmHWM")
  stats = result["rerank_stats"]
  sec = stats["seconds"]
  n = nq + ng
  flops = n * n / 2 * 2.0 * p * (args.rerank_lists_channels or c)
  print(f"    total {total:,.0f} s: neighbour search {sec['neighbours']:,.0f} s "
        f"({flops / sec['neighbours'] / 1e9:,.0f} GFLOP/s in its distance GEMMs), sparse "
        f"encoding {sec['encoding']:,.0f} s, streamed ranking {sec['ranking']:,.0f} s; "
        f"mAP {result['mAP']:.4f}")
  est = rerank.memory_estimate(nq, ng, parts=p, channels=c,
                               query_block=args.query_block)
  sparse_bytes = 8 * n * (stats["v_nonzeros_per_row"] + 2 * stats["v_mean_nonzeros_per_row"])
  print(f"    peak resident memory {peak / gib:.2f} GiB (the features {feat_bytes / gib:.2f}"
        f" GiB included; {(peak - base) / gib:+.2f} GiB over the start of the phase); "
        f"goal <= 8 GiB at the full shape")
  print(f"    V: {stats['v_nonzeros_per_row']:.1f} non-zeros a row, its k2-mean "
        f"{stats['v_mean_nonzeros_per_row']:.1f} ({sparse_bytes / gib:.2f} GiB with the "
        f"CSC copy); {stats['pairs_outside_lists']:,} distances outside the k1+1 lists; "
        f"rerank.memory_estimate: typical {est['typical'] / gib:.2f} GiB, bound "
        f"{est['bound'] / gib:.2f} GiB besides the features")
  out = {"rerank_queries": nq, "rerank_gallery": ng, "rerank_channels": c,
         "rerank_s": total, "rerank_seconds": sec, "rerank_peak_bytes": peak,
         "rerank_feature_bytes": feat_bytes, "rerank_stats": stats}
  if scale != 1:
    full_n = args.rerank_q + args.rerank_g
    full = (sec["neighbours"] * (full_n / n) ** 2 + sec["encoding"] * full_n / n
            + sec["ranking"] * args.rerank_q * args.rerank_g / (nq * ng))
    print(f"    extrapolated to {args.rerank_q:,} x {args.rerank_g:,} at C={c}: "
          f"{full / 60:,.0f} min (neighbours x n^2, encoding x n, ranking x Q G)")
    out["rerank_extrapolated_full_s"] = full
  return out


class _Stop(Exception):
  pass


def _rerank_probe(args, query, gallery, feat_bytes):
  """The first --rerank_probe_pairs block pairs of the neighbour search (the bulk
  of the work) at this shape: seconds a pair, the whole search's time, peak memory."""
  items = neighbours.JointItems([(query.feats, query.areas),
                                 (gallery.feats, gallery.areas)])
  fetch, calls, marks = items.block, [0], {}

  def block(lo, size):  # one call per block pair (and one per row of pairs)
    calls[0] += 1
    if calls[0] in (3, args.rerank_probe_pairs + 3):
      marks[calls[0]] = time.perf_counter()
    if calls[0] == args.rerank_probe_pairs + 3:
      raise _Stop
    return fetch(lo, size)

  items.block = block
  base = _rss_reset()
  prepare, pair = rerank._SCORES["cam_squared"]
  try:
    neighbours.nearest(items, 21, prepare=prepare, pair=pair, progress=True)
  except _Stop:
    pass
  peak = _status("VmHWM")
  n = len(items)
  blocks = -(-n // neighbours.DEFAULT_BLOCK)
  per_pair = (marks[args.rerank_probe_pairs + 3] - marks[3]) / args.rerank_probe_pairs
  total_pairs = blocks * (blocks + 1) // 2
  gib = 2.0**30
  p, c = args.parts, args.channels
  print(f"    probe: {args.rerank_probe_pairs} block pairs of {total_pairs:,} measured: "
        f"{per_pair:.2f} s a pair ({2.0 * neighbours.DEFAULT_BLOCK**2 * p * c / per_pair / 1e9:,.0f}"
        f" GFLOP/s) -> the whole neighbour search {per_pair * total_pairs / 60:,.0f} min; "
        f"peak resident memory {peak / gib:.2f} GiB (features {feat_bytes / gib:.2f} GiB; "
        f"{(peak - base) / gib:+.2f} GiB over the start of the phase)")
  return {"probe_pairs": args.rerank_probe_pairs, "probe_s_per_pair": per_pair,
          "probe_neighbours_s": per_pair * total_pairs, "probe_peak_bytes": peak,
          "rerank_feature_bytes": feat_bytes}


def _dense_torch(qf, qa, gf, ga):
  """The official code's evaluation-time distance, op for op (on the GPU if there is one)."""
  import torch
  import torch.nn.functional as F
  device = "cuda" if torch.cuda.is_available() else "cpu"
  qf, qa, gf, ga = (torch.from_numpy(x).to(device) for x in (qf, qa, gf, ga))
  mats = []
  for p in range(qf.shape[1]):
    q, g = qf[:, p], gf[:, p]
    d = (q.pow(2).sum(1, keepdim=True).expand(q.shape[0], g.shape[0]) +
         g.pow(2).sum(1, keepdim=True).expand(g.shape[0], q.shape[0]).t())
    mats.append(d.addmm(q, g.t(), beta=1, alpha=-2))
  dist_QxGxP = torch.stack(mats, dim=-1)
  areas_QxGxP = torch.stack([qa[:, p, None] * ga[None, :, p]
                             for p in range(qa.shape[1])], dim=-1)
  return (dist_QxGxP * F.normalize(areas_QxGxP, dim=-1, p=1)).sum(-1).cpu().numpy()


@jax.jit
def _dense_jax(qf, qa, gf, ga):
  sq_q, sq_g = jnp.sum(qf * qf, -1), jnp.sum(gf * gf, -1)
  cross_QxGxP = jnp.einsum("qpc,gpc->qgp", qf, gf, precision=HIGHEST)
  dist_QxGxP = sq_q[:, None, :] + sq_g[None, :, :] - 2.0 * cross_QxGxP
  w_QxGxP = qa[:, None, :] * ga[None, :, :]
  w_QxGxP = w_QxGxP / jnp.sum(w_QxGxP, -1, keepdims=True)
  return jnp.sum(dist_QxGxP * w_QxGxP, -1)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--q", type=int, default=10000, help="full-size queries")
  parser.add_argument("--g", type=int, default=128517, help="full-size gallery")
  parser.add_argument("--scale", type=float, default=0.1,
                      help="Q and G multiplier for the end-to-end run")
  parser.add_argument("--parts", type=int, default=5)
  parser.add_argument("--channels", type=int, default=2048)
  parser.add_argument("--query_block", type=int, default=512)
  parser.add_argument("--block_gallery", type=int, default=8192,
                      help="gallery size of the single-block measurements")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--json", default="", help="also write the figures to this file")
  parser.add_argument("--sections", default="base,aqe,rerank",
                      help="comma-separated: base (1-5), aqe (6), rerank (7)")
  parser.add_argument("--aqe_q", type=int, default=1678, help="[6] queries (VeRi-776)")
  parser.add_argument("--aqe_g", type=int, default=11579, help="[6] gallery (VeRi-776)")
  parser.add_argument("--rerank_q", type=int, default=10000, help="[7] full-size queries")
  parser.add_argument("--rerank_g", type=int, default=128517,
                      help="[7] full-size gallery")
  parser.add_argument("--rerank_scale", type=float, default=0.1,
                      help="[7] Q and G multiplier (1: VERI-Wild large's shape)")
  parser.add_argument("--rerank_lists_channels", type=int, default=0,
                      help="[7] take the neighbour lists from this many channels of each "
                           "branch (a cheaper search), the rest on all: the encoding and "
                           "ranking's time and memory at shapes too long to run whole")
  parser.add_argument("--rerank_probe_pairs", type=int, default=0,
                      help="[7] run only this many block pairs of the neighbour search "
                           "and extrapolate (for shapes too long to run whole)")
  args = parser.parse_args()
  sections = set(args.sections.split(","))
  if sections - {"base", "aqe", "rerank"}:
    parser.error(f"--sections {args.sections}: expected base, aqe, rerank")
  p, c = args.parts, args.channels
  rng = np.random.default_rng(0)
  print(f"jax {jax.__version__} on {jax.device_count()} x "
        f"{jax.devices()[0].device_kind}; P={p}, C={c}")
  figures = {"device": jax.devices()[0].device_kind, "parts": p, "channels": c}
  if "base" in sections:
    figures.update(_base_sections(args, rng))
  if "aqe" in sections:
    figures.update(_aqe_section(args, rng, process.make_mesh()))
  if "rerank" in sections:
    figures.update(_rerank_section(args, rng))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(figures, f, indent=2)


def _base_sections(args, rng) -> dict:
  """[1]-[5]: the distance GEMM, the dense form, the ranking, evaluate end to end."""
  p, c, qb, gb = args.parts, args.channels, args.query_block, args.block_gallery

  # 1-2. GEMM rate and the distance block on the same shape.
  q = _features(rng, qb, p, c, 1000)
  g = _features(rng, gb, p, c, 1000)
  flops = 2.0 * qb * gb * p * c
  a = jnp.asarray(q.feats.reshape(qb, -1))
  b = jnp.asarray(g.feats.reshape(gb, -1))
  matmul = jax.jit(lambda x, y: jnp.matmul(x, y.T, precision=HIGHEST))
  t_gemm = _best(lambda: matmul(a, b).block_until_ready(), args.repeats)
  print(f"\n[1] float32 GEMM ({qb} x {p * c}) @ ({p * c} x {gb}): "
        f"{t_gemm:.3f} s = {flops / t_gemm / 1e9:,.0f} GFLOP/s (machine rate)")
  mesh = process.make_mesh()
  g_prep, _ = ranking._prepare_gallery(g, "cam_squared", mesh)
  qf, qa = jnp.asarray(q.feats), jnp.asarray(q.areas)
  dist_fn = lambda kind: ranking._query_distance(
      qf, qa, g_prep, distance=kind, precision=HIGHEST)
  base = _rss_reset()
  t_dist = _best(lambda: dist_fn("cam_squared").block_until_ready(), args.repeats)
  mem_dist = _peak_since(base)
  print(f"[2] cam_squared block ({qb} x {gb}): {t_dist:.3f} s = "
        f"{flops / t_dist / 1e9:,.0f} GFLOP/s = {t_gemm / t_dist:.0%} of the "
        f"GEMM rate (goal >= 70%); peak {mem_dist}")
  g_cam, _ = ranking._prepare_gallery(g, "cam", mesh)
  t_cam = _best(lambda: ranking._query_distance(
      qf, qa, g_cam, distance="cam", precision=HIGHEST).block_until_ready(),
                args.repeats)
  print(f"    cam (paper, non-squared) block: {t_cam:.3f} s = "
        f"{t_gemm / t_cam:.0%} of the GEMM rate")
  g_cam = None  # frees the prepared gallery before the next part

  # 3. The dense (Q, G, P) form.
  ours = np.asarray(dist_fn("cam_squared"))
  base = _rss_reset()
  t_torch = _best(lambda: _dense_torch(q.feats, q.areas, g.feats, g.areas),
                  args.repeats)
  mem_torch = _peak_since(base)
  err = np.abs(_dense_torch(q.feats, q.areas, g.feats, g.areas) - ours).max()
  base = _rss_reset()
  dense_args = tuple(jnp.asarray(x) for x in (q.feats, q.areas, g.feats, g.areas))
  t_djax = _best(lambda: _dense_jax(*dense_args).block_until_ready(), args.repeats)
  mem_djax = _peak_since(base)
  print(f"[3] dense (Q,G,P) official form, torch: {t_torch:.3f} s (peak {mem_torch}),"
        f" max |D - ours| = {err:.1e}")
  print(f"    dense (Q,G,P) form, jax: {t_djax:.3f} s (peak {mem_djax})")
  print(f"    speed-up of the single-GEMM form: {t_torch / t_dist:.1f}x over torch "
        f"dense, {t_djax / t_dist:.1f}x over jax dense (goal >= 10x)")

  # 4. Ranking the same block: on device (exact) vs the numpy reference.
  ids_q = rng.integers(0, gb // 13, qb)
  ids_g = rng.integers(0, gb // 13, gb)  # about 13 images per id, as VERI-Wild
  cams_q, cams_g = rng.integers(0, 174, qb), rng.integers(0, 174, gb)
  # The ranking's private parts, timed alone:
  table = ranking._SameIdTable(ids_q, ids_g, cams_q, cams_g, True)
  (queries, width), = ranking._query_blocks(table, qb)
  same_id = [jnp.asarray(ranking._pad_rows(x, qb)) for x in table.table(queries, width)]
  dist_dev, g_valid = dist_fn("cam_squared"), jnp.ones(gb, bool)
  t_rank = _best(lambda: jax.block_until_ready(ranking._distmat_block(
      dist_dev, g_valid, *same_id)), args.repeats)
  print(f"[4] exact ranking of the block on the device ({width} same-id slots per query):"
        f" {t_rank:.3f} s = {t_rank / t_dist:.0%} of the block's distance time [2]"
        " (goal <= 15%)")
  t_rank_dev = _best(lambda: ranking.rank_distmat(
      ours, ids_q, ids_g, cams_q, cams_g, query_block=qb, mesh=mesh), 1)
  t_rank_np = _best(lambda: reference.rank_metrics(
      ours, ids_q, ids_g, cams_q, cams_g), 1, warmup=False)
  print(f"    from the host (rank_distmat, with the copy of D and the same-id table): "
        f"{t_rank_dev:.3f} s; numpy reference {t_rank_np:.3f} s")
  q_ids = saved_features.Features(q.feats, q.areas, ids_q, cams_q)
  g_ids = saved_features.Features(g.feats, g.areas, ids_g, cams_g)
  t_fused = _best(lambda: jax.block_until_ready(ranking.evaluate(
      q_ids, g_ids, query_block=qb, mesh=mesh)), 1)
  print(f"    distance + exact ranking of the block (evaluate): {t_fused:.3f} s;"
        f" official pipeline (torch dense + numpy ranking): "
        f"{t_torch + t_rank_np:.3f} s -> {(t_torch + t_rank_np) / t_fused:.1f}x")

  # 5. End-to-end on a VERI-Wild-large-shaped problem.
  nq, ng = int(args.q * args.scale), int(args.g * args.scale)
  num_ids = max(nq, 1)
  query = _features(rng, nq, p, c, num_ids)
  gallery = _features(rng, ng, p, c, num_ids)
  t0 = time.perf_counter()
  ranking.evaluate(query, gallery, query_block=qb, mesh=mesh)
  t_cold = time.perf_counter() - t0
  base = _rss_reset()
  t0 = time.perf_counter()
  result = ranking.evaluate(query, gallery, query_block=qb, mesh=mesh)
  t_eval = time.perf_counter() - t0
  mem_eval = _peak_since(base)
  factor = (args.q * args.g) / (nq * ng)
  # The distance's GEMMs (the area-scaled features, P*C wide) at [1]'s measured rate.
  t_gemm_eval = 2.0 * nq * ng * p * c / (flops / t_gemm)
  print(f"[5] evaluate {nq:,} x {ng:,} (P={p}, C={c}, {result['num_valid_queries']:,}"
        f" valid queries): {t_eval:.2f} s warm ({t_cold:.2f} s with compilation),"
        f" peak {mem_eval}")
  print(f"    its distance GEMMs at the measured float32 rate of [1] take "
        f"{t_gemm_eval:.2f} s = {t_gemm_eval / t_eval:.0%} of the wall time (GEMM share)")
  print(f"    extrapolated to {args.q:,} x {args.g:,}: {t_eval * factor:,.0f} s "
        f"(x{factor:,.0f}); the same pairs at the block rate of [2]: "
        f"{t_dist * args.q * args.g / (qb * gb):,.0f} s")
  dense_bytes = 4.0 * args.q * args.g * p
  print(f"    for scale: one dense (Q,G,P) float32 tensor at full size is "
        f"{dense_bytes / 2**30:,.1f} GiB; our device block is "
        f"{4.0 * qb * args.g / 2**30:,.2f} GiB ({qb} x G)")
  return {"queries": nq, "gallery": ng, "gemm_gflops": flops / t_gemm / 1e9,
          "block_distance_s": t_dist, "block_gemm_fraction": t_gemm / t_dist,
          "block_rank_s": t_rank, "block_rank_share": t_rank / t_dist,
          "block_rank_from_host_s": t_rank_dev, "block_rank_numpy_s": t_rank_np,
          "block_evaluate_s": t_fused, "block_official_s": t_torch + t_rank_np,
          "official_vs_ours": (t_torch + t_rank_np) / t_fused,
          "evaluate_s": t_eval, "evaluate_cold_s": t_cold,
          "gemm_share": t_gemm_eval / t_eval, "extrapolated_full_s": t_eval * factor}


if __name__ == "__main__":
  main()
