"""City-scale search: the approximate index (retrieval/gallery_index.py) against exact
brute force.

    flock /work/bench.lock .venv/bin/python scripts/bench_search.py     # 1,000,000 images
    .venv/bin/python scripts/bench_search.py --num_items 100000         # a quick look

Synthetic, clustered gallery written as .npz shards (the format embed writes):
vehicle "models" (group centres), identities around them, about --per_id images
of each identity (uniform in [per_id/2, 3 per_id/2]) as identity centre plus
per-image noise, L2-normalised per branch; part areas vary around each
identity's own profile, the global branch has its pseudo-area 1/(P-1).
Queries are new images of gallery identities.

The feature size is P = 5 branches (MUSP's default n = 5) of C = 128 channels
(not 2048): the full-precision store of 1M images is then 2.6 GB and the SQ8
codes 0.65 GB, so the run fits the shared 24 GiB, 2-core machine next to other
jobs; exact search and the index both cost about linearly in P*C, so the speed
ratio does not depend much on C.

Prints, all measured in this run:
  1. shard generation (not timed against anything);
  2. index build time, index size in memory (ann.faiss) and on disk (feature
     store + labels), peak memory of the build;
  3. exact CAM search (ranking.distance_matrix over each shard, all queries,
     top k merged): seconds per query, amortised over the batch;
  4. for each (nprobe, candidates): recall@k against 3, seconds per query
     batched, single-query latency p50/p95, the speed-up over 3, and whether
     the returned distances equal the exact ones;
  5. memory: resident set after opening the index and after searching;
  6. with --sections append: a growing index, trained on the first shard and appended the
     others one at a time (`search index --append`), against a build on all the
     shards with the same parameters (the lists and codec of one shard's auto
     choice): build and append times, recall@k at each setting of 4.

    .venv/bin/python scripts/bench_search.py --num_items 200000 --shard_items 20000 \
        --sections append        # the figures in README (10 shards)
"""

import argparse
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time

import numpy as np

import bench_eval  # scripts/ is on sys.path when this file runs as a script
from musp_jax.retrieval import gallery_index as index_lib
from musp_jax.retrieval import ranking
from musp_jax.retrieval import saved_features
from musp_jax.core import features

SIGNATURE = json.dumps({"synthetic": "bench_search"})


class Synthetic:
  """The clustered gallery, generated shard by shard (deterministic in the seed)."""

  def __init__(self, args):
    self.args = args
    p, c = args.parts, args.channels
    rng = np.random.default_rng(args.seed)
    per = args.per_id
    counts = rng.integers(per // 2, per * 3 // 2 + 1, size=2 * args.num_items // per + 1)
    num_ids = int(np.searchsorted(np.cumsum(counts), args.num_items)) + 1
    counts = counts[:num_ids]
    counts[-1] -= int(counts.sum()) - args.num_items
    self.ids = np.repeat(np.arange(num_ids), counts)
    num_groups = max(1, num_ids // args.group_size)
    groups = features.l2_normalize(
        rng.standard_normal((num_groups, p, c), np.float32))
    group_of = rng.integers(0, num_groups, num_ids)
    self.centres = np.empty((num_ids, p, c), np.float32)
    for lo in range(0, num_ids, 65536):  # bounded temporaries
      hi = min(lo + 65536, num_ids)
      self.centres[lo:hi] = features.l2_normalize(
          groups[group_of[lo:hi]] + args.identity_spread / np.sqrt(c)
          * rng.standard_normal((hi - lo, p, c), np.float32))
    self.profiles = rng.dirichlet(np.full(p - 1, 4.0), num_ids).astype(np.float32)

  def images(self, ids: np.ndarray, rng: np.random.Generator
             ) -> tuple[np.ndarray, np.ndarray]:
    c = self.args.channels
    noise = rng.standard_normal((len(ids), *self.centres.shape[1:]), np.float32)
    feats = features.l2_normalize(self.centres[ids] + self.args.noise / np.sqrt(c) * noise)
    parts = rng.gamma(20.0 * self.profiles[ids] + 0.5).astype(np.float32)
    areas = np.empty((len(ids), self.args.parts), np.float32)
    areas[:, :-1] = parts / parts.sum(axis=1, keepdims=True)
    areas[:, -1] = 1.0 / (self.args.parts - 1)
    return feats.astype(np.float32), areas

  def write_shards(self, folder: pathlib.Path) -> list[pathlib.Path]:
    paths = []
    for s, lo in enumerate(range(0, self.args.num_items, self.args.shard_items)):
      hi = min(lo + self.args.shard_items, self.args.num_items)
      feats, areas = self.images(self.ids[lo:hi], np.random.default_rng([self.args.seed, s]))
      paths.append(folder / f"gallery_{s:03d}.npz")
      saved_features.save_features(paths[-1], saved_features.Features(
          feats, areas, self.ids[lo:hi], np.arange(lo, hi) % 174,
          np.array([f"cam{i % 174:03d}/{i:08d}.jpg" for i in range(lo, hi)]), SIGNATURE))
    return paths

  def queries(self) -> saved_features.Features:
    rng = np.random.default_rng([self.args.seed, 10**6])
    ids = rng.choice(self.ids, self.args.num_queries)
    feats, areas = self.images(ids, rng)
    return saved_features.Features(feats, areas, ids, np.full(len(ids), -1),
                              np.array([f"q{i}" for i in range(len(ids))]), SIGNATURE)


def exact_search(query: saved_features.Features, shards: list[pathlib.Path], k: int
                 ) -> tuple[np.ndarray, np.ndarray, float]:
  """Brute-force top k over the shards, one in memory at a time; compute seconds."""
  best_d = np.full((len(query), 0), np.inf, np.float32)
  best_i = np.zeros((len(query), 0), np.int64)
  offset, seconds = 0, 0.0
  for path in shards:
    gallery = saved_features.load_features(path)  # reading is not counted
    t = time.perf_counter()
    dist = ranking.distance_matrix(query, gallery, query_block=len(query))
    top = np.argpartition(dist, k - 1, axis=1)[:, :k]
    cand_d = np.concatenate([best_d, np.take_along_axis(dist, top, 1)], 1)
    cand_i = np.concatenate([best_i, top + offset], 1)
    order = np.lexsort((cand_i, cand_d), axis=1)[:, :k]
    best_d = np.take_along_axis(cand_d, order, 1)
    best_i = np.take_along_axis(cand_i, order, 1)
    seconds += time.perf_counter() - t
    offset += len(gallery)
    del gallery, dist
  return best_d, best_i, seconds


def _mib(n: float) -> str:
  return f"{n / 2**20:,.0f} MiB"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_items", type=int, default=1_000_000)
  parser.add_argument("--num_queries", type=int, default=1000)
  parser.add_argument("--parts", type=int, default=5)
  parser.add_argument("--channels", type=int, default=128)
  parser.add_argument("--per_id", type=int, default=10, help="mean images per identity")
  parser.add_argument("--group_size", type=int, default=100,
                      help="identities per vehicle model (group centre)")
  parser.add_argument("--identity_spread", type=float, default=0.8)
  parser.add_argument("--noise", type=float, default=0.5)
  parser.add_argument("--shard_items", type=int, default=100_000)
  parser.add_argument("--k", type=int, default=10)
  parser.add_argument("--codec", default="auto")
  parser.add_argument("--nlist", type=int, default=None)
  parser.add_argument("--settings", default="4:20,8:20,16:20,16:50",
                      help="nprobe:candidates pairs to measure")
  parser.add_argument("--latency_queries", type=int, default=None,
                      help="queries timed one at a time (default: all)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--sections", default="search",
                      help="search (1-5), append (1, 3, 6), or both: search,append")
  parser.add_argument("--workdir", default=None,
                      help="where shards and the index go (default: a temporary folder, "
                           "removed at the end)")
  args = parser.parse_args()
  work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="bench_search_"))
  work.mkdir(parents=True, exist_ok=True)
  try:
    run(args, work)
  finally:
    if args.workdir is None:
      shutil.rmtree(work, ignore_errors=True)


def run(args, work: pathlib.Path) -> None:
  print(f"{args.num_items:,} gallery images, {args.num_queries:,} queries, "
        f"P={args.parts}, C={args.channels}, ~{args.per_id} images per identity, "
        f"{os.cpu_count()} CPUs; faiss {index_lib.faiss.__version__}")

  t = time.perf_counter()
  data = Synthetic(args)
  shards = data.write_shards(work)
  query = data.queries()
  same_id = len(np.unique(data.ids))
  del data
  print(f"\n[1] generated {len(shards)} shards of <= {args.shard_items:,} "
        f"({same_id:,} identities) in {time.perf_counter() - t:.0f} s")

  if "search" in args.sections.split(","):
    _search_sections(args, work, shards, query)
  if "append" in args.sections.split(","):
    _append_section(args, work, shards, query)


def _recall(idx: np.ndarray, exact_i: np.ndarray, k: int) -> float:
  return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(idx, exact_i)]))


def _append_section(args, work: pathlib.Path, shards: list[pathlib.Path],
                    query: saved_features.Features) -> None:
  """[6] Trained on one shard, grown by appends, against a build on all shards."""
  k = args.k
  _, exact_i, _ = exact_search(query, shards, k)
  first = saved_features.load_features(shards[0])
  auto = index_lib._resolve(index_lib.Spec(codec=args.codec), len(first),
                            args.parts, args.channels)
  del first
  codec = "sq8" if args.codec == "auto" else args.codec
  spec = index_lib.Spec(codec=codec, nlist=args.nlist or auto["nlist"])
  t = time.perf_counter()
  full = index_lib.build_index(shards, work / "full.index", spec)
  t_full = time.perf_counter() - t
  t = time.perf_counter()
  grown = index_lib.build_index(shards[:1], work / "grown.index", spec)
  t_first = time.perf_counter() - t
  t_appends = []
  for shard in shards[1:]:
    t = time.perf_counter()
    index_lib.append(grown, [shard])
    t_appends.append(time.perf_counter() - t)
  a, b = index_lib.GalleryIndex(full), index_lib.GalleryIndex(grown)
  print(f"[6] growing index ({a.params['factory']}): build on all {len(shards)} shards "
        f"{t_full:.0f} s (trained on {a.params['train_size']:,}); build on shard 1 "
        f"{t_first:.0f} s (trained on {b.params['train_size']:,}) + {len(t_appends)} "
        f"appends of {args.shard_items:,} images, {np.mean(t_appends):.1f} s each "
        f"(max {max(t_appends, default=0):.1f} s)")
  print(f"    {'nprobe':>6} {'cand':>5} {'recall@' + str(k) + ' all':>13} "
        f"{'1 + appends':>12}")
  for setting in args.settings.split(","):
    nprobe, cand = (int(v) for v in setting.split(":"))
    nprobe = min(nprobe, spec.nlist)
    r = [_recall(ix.search(query, k, nprobe=nprobe, candidates=cand)[1], exact_i, k)
         for ix in (a, b)]
    print(f"    {nprobe:>6} {cand:>5} {r[0]:>13.4f} {r[1]:>12.4f}")


def _search_sections(args, work: pathlib.Path, shards: list[pathlib.Path],
                     query: saved_features.Features) -> None:
  """[2]-[5]: the build, exact search and the index's search."""
  k = args.k
  base = bench_eval._rss_reset()
  t = time.perf_counter()
  out = index_lib.build_index(shards, work / "gallery.index",
                              index_lib.Spec(codec=args.codec, nlist=args.nlist))
  t_build = time.perf_counter() - t
  peak_build = bench_eval._status("VmHWM") - base
  files = json.loads((out / index_lib.META).read_text())["files"]
  ann_bytes = files[index_lib.ANN]["bytes"]
  disk = sum(f["bytes"] for f in files.values())
  shard_bytes = sum(p.stat().st_size for p in shards)
  t = time.perf_counter()
  gallery = index_lib.GalleryIndex(out)
  t_open = time.perf_counter() - t
  params = gallery.params
  print(f"[2] build: {t_build:.0f} s ({params['factory']}, trained on "
        f"{params['train_size']:,}, default nprobe {params['nprobe']}); index in memory "
        f"{_mib(ann_bytes)} "
        f"({ann_bytes / len(gallery):.0f} B/image); on disk {_mib(disk)} with the "
        f"feature store (shards: {_mib(shard_bytes)}); peak memory "
        f"{_mib(peak_build)} above the start; open {t_open:.1f} s")

  exact_d, exact_i, t_exact = exact_search(query, shards, k)
  per_exact = t_exact / len(query)
  print(f"[3] exact CAM search: {t_exact:.1f} s for {len(query):,} queries = "
        f"{per_exact * 1e3:.2f} ms per query (amortised, all queries per block)")

  print(f"[4] index search (2 passes, exact re-ranking), k={k}:")
  print(f"    {'nprobe':>6} {'cand':>5} {'recall@' + str(k):>9} {'ms/query':>9} "
        f"{'speed-up':>9} {'p50 ms':>7} {'p95 ms':>7} {'dist ok':>7}")
  lat_n = min(args.latency_queries or len(query), len(query))
  rss_open = bench_eval._status("VmRSS")
  for setting in args.settings.split(","):
    nprobe, cand = (int(v) for v in setting.split(":"))
    nprobe = min(nprobe, params["nlist"])
    search = lambda q, n=nprobe, c=cand: gallery.search(q, k, nprobe=n, candidates=c)
    search(query.take(np.arange(1)))  # compile the single-query shapes
    search(query.take(np.arange(min(len(query), 256))))  # and the batched ones
    t = time.perf_counter()
    dist, idx = search(query)
    t_batch = time.perf_counter() - t
    latencies = []
    for q in range(lat_n):
      one = query.take(np.array([q]))
      t = time.perf_counter()
      search(one)
      latencies.append(time.perf_counter() - t)
    recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(idx, exact_i)])
    # Distances of the items both found must agree (exact re-ranking).
    match = idx[:, :, None] == exact_i[:, None, :]
    diff = np.abs(dist[:, :, None] - exact_d[:, None, :])[match]
    dist_ok = bool(diff.size == 0 or diff.max() < 1e-4)
    per = t_batch / len(query)
    p50, p95 = np.percentile(latencies, [50, 95]) * 1e3
    print(f"    {nprobe:>6} {cand:>5} {recall:>9.4f} {per * 1e3:>9.3f} "
          f"{per_exact / per:>8.0f}x {p50:>7.2f} {p95:>7.2f} {str(dist_ok):>7}")
  print(f"[5] memory: resident {_mib(rss_open)} after opening the index, "
        f"{_mib(bench_eval._status('VmRSS'))} after searching "
        f"(feature store pages read through the page cache)")
  print("Goal: recall@10 >= 0.99 at >= 50x the exact search's per-query speed.")


if __name__ == "__main__":
  sys.exit(main())
