"""Our re-ranking and AQE against fast-reid's own code, on the same features.

    git clone https://github.com/JDAI-CV/fast-reid /tmp/fast-reid   # its 1.4 sources
    .venv/bin/python scripts/compare_fastreid.py --fastreid /tmp/fast-reid

fast-reid's evaluator (fastreid/evaluation/reid_evaluation.py) with TEST.RERANK
computes dist = build_dist(q, g, TEST.METRIC) and
rerank = build_dist(q, g, "jaccard", k1, k2), i.e. compute_jaccard_distance on
the joint features (L2-normalised first for the cosine metric), and ranks
rerank * (1 - lambda) + dist * lambda. Its build_dist runs the k-nearest search
with faiss on a GPU (search_option=0); here compute_jaccard_distance runs with
search_option=3, faiss' exact IndexFlatL2 on the CPU: the same search.

On the same plain (N, D) features (clustered synthetic identities, cosine metric)
this prints, each ranked by our exact ranking:
  1. the final distances of our `evaluate(distance="cosine", rerank=True)`
     (Zhong et al.'s k-reciprocal re-ranking, sparse) and of fast-reid's
     TEST.RERANK path: largest and mean difference, mAP / CMC@1 / mINP of each,
     queries whose first result differs;
  2. ours with k1 - 1, the neighbour count fast-reid's path effectively uses (it
     searches k1 neighbours, the item itself included, where Zhong et al. take
     k1 + 1), to separate that difference from the others (V's weights and the
     lambda term on raw instead of column-max-normalised distances);
  3. compat.aqe against fast-reid's aqe (fastreid/evaluation/query_expansion.py).
"""

import argparse
import pathlib
import sys
import time

import numpy as np

import bench_eval  # scripts/ is on sys.path when this file runs as a script
from musp_jax import compat
from musp_jax.retrieval import ranking


def _row(name, result):
  return (f"    {name:<44} mAP {result['mAP']:.4f}  CMC@1 {result['cmc'][0]:.4f}  "
          f"mINP {result['mINP']:.4f}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--fastreid", required=True, help="a fast-reid source checkout")
  parser.add_argument("--q", type=int, default=500)
  parser.add_argument("--g", type=int, default=5000)
  parser.add_argument("--dim", type=int, default=256)
  parser.add_argument("--k1", type=int, default=20)
  parser.add_argument("--k2", type=int, default=6)
  parser.add_argument("--lambda_value", type=float, default=0.3)
  args = parser.parse_args()
  sys.path.insert(0, str(pathlib.Path(args.fastreid).resolve()))
  import torch
  from fastreid.evaluation import query_expansion as fastreid_qe
  from fastreid.utils import compute_dist

  rng = np.random.default_rng(0)
  query, gallery = bench_eval._query_gallery(rng, args.q, args.g, 1, args.dim)
  labels = (query.ids, gallery.ids, query.cams, gallery.cams)
  qf, gf = query.feats[:, 0], gallery.feats[:, 0]
  print(f"{args.q:,} queries x {args.g:,} gallery, (N, {args.dim}) features, cosine "
        f"metric; k1 {args.k1}, k2 {args.k2}, lambda {args.lambda_value}")

  t = time.perf_counter()
  feats = torch.nn.functional.normalize(torch.from_numpy(np.concatenate([qf, gf])), dim=1)
  jaccard = compute_dist.compute_jaccard_distance(feats, k1=args.k1, k2=args.k2,
                                                  search_option=3)[:args.q, args.q:]
  cosine = compute_dist.build_dist(torch.from_numpy(qf), torch.from_numpy(gf), "cosine")
  theirs = jaccard * (1 - args.lambda_value) + cosine * args.lambda_value
  t_theirs = time.perf_counter() - t
  t = time.perf_counter()
  ours = ranking.evaluate(query, gallery, distance="cosine", rerank=True,
                            rerank_k1=args.k1, rerank_k2=args.k2,
                            rerank_lambda=args.lambda_value, return_distmat=True)
  t_ours = time.perf_counter() - t
  fewer = ranking.evaluate(query, gallery, distance="cosine", rerank=True,
                             rerank_k1=args.k1 - 1, rerank_k2=args.k2,
                             rerank_lambda=args.lambda_value, return_distmat=True)
  plain = ranking.rank_distmat(cosine, *labels)
  ranked = ranking.rank_distmat(theirs, *labels)
  print(f"[1] final distances, ours (sparse) - fast-reid (jaccard path): max "
        f"|diff| {np.abs(ours['distmat'] - theirs).max():.4f}, mean "
        f"{np.abs(ours['distmat'] - theirs).mean():.4f}; first result differs for "
        f"{np.mean(ours['distmat'].argmin(1) != theirs.argmin(1)):.1%} of the queries "
        f"(ours {t_ours:.1f} s, fast-reid's {t_theirs:.1f} s on this CPU)")
  print(_row("no re-ranking (cosine)", plain))
  print(_row(f"ours, k1 = {args.k1}", ours))
  print(_row(f"ours, k1 = {args.k1 - 1} (fast-reid's neighbour count)", fewer))
  print(_row(f"fast-reid TEST.RERANK (k1 = {args.k1})", ranked))
  print(f"[2] ours with k1 - 1 vs fast-reid: max |diff| "
        f"{np.abs(fewer['distmat'] - theirs).max():.4f}, mean "
        f"{np.abs(fewer['distmat'] - theirs).mean():.4f}")

  want = fastreid_qe.aqe(torch.from_numpy(qf), torch.from_numpy(gf), 1, 10, 3.0)
  got = compat.aqe(torch.from_numpy(qf), torch.from_numpy(gf), 1, 10, 3.0)
  diff = max(float((a - b).abs().max()) for a, b in zip(got, want))
  print(f"[3] compat.aqe vs fast-reid's aqe (qe_times 1, qe_k 10, alpha 3): max |diff| "
        f"{diff:.1e} (features of norm {float(want[0].norm(dim=1).mean()):.3f})")


if __name__ == "__main__":
  main()
