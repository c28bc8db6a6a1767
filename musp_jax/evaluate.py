"""Evaluate saved features of any model, optionally with a dataset's protocol.

    python -m musp_jax.evaluate --query q.npz --gallery g.npz
    python -m musp_jax.evaluate --query q.npz --gallery g.npz --protocol veri776 --rerank
    python -m musp_jax.evaluate --query q.npz --gallery g.npz --protocol veri_wild --size small
    python -m musp_jax.evaluate --test test.npz --protocol vehicle_id --size small --json out.json
    python -m musp_jax.evaluate --query q.npz --gallery g.npz --aqe --roc roc.png --json out.json

Prints the paper's table (mAP, CMC@1/5/10, mINP in %) and, with --json, writes
{"results": {row: metrics}, ...}. Files are .npz in either layout that
`saved_features.load_features` reads:
  - ours (`python -m musp_jax.embed`, `saved_features.save_features`): feats (N, P, C),
    areas (N, P), vehicle_id (N,), camera_id (N,) [, file_name, model_signature];
  - plain, for any model: feats (N, D) or (N, P, C) float, pids (N,) int,
    camids (N,) int [, areas (N, P)]; use camera id -1 where there is none.
Without --protocol, junk (same id and same camera as the query) is removed as
in VeRi-776 / fast-reid; --keep_junk keeps it. VehicleID's protocol builds its
query/gallery splits itself (10 seeded random one-image-per-id galleries,
averaged, and the first-image gallery), so it takes the whole test list as one
file: --test. Query and gallery made by different models (model_signature) are
refused.

--rerank (k-reciprocal re-ranking) and --aqe (alpha query expansion) work with
every protocol and any size, streamed in bounded memory (retrieval/rerank.py,
retrieval/query_expansion.py). --roc (without --protocol) adds verification
figures over all query-gallery pairs: TPR at FPR 1e-4 ... 1e-1, the EER and the
distance threshold for --target_fpr (written to --json, where `search
--max_distance` reads it), and a plot (retrieval/verification.py).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import ml_collections

from musp_jax.data import datasets
from musp_jax.core import features
from musp_jax.runtime import cli
from musp_jax.runtime import writing
from musp_jax.retrieval import protocols
from musp_jax.retrieval import ranking
from musp_jax.retrieval import saved_features


def _read(path: str, role: str) -> saved_features.Features:
  features = saved_features.load_features(path)
  if len(features) == 0:
    raise ValueError(f"{path}: the {role} has no rows")
  return features


def _check_same_model(query: saved_features.Features, gallery: saved_features.Features,
                      query_path: str, gallery_path: str) -> None:
  if query.model_signature and gallery.model_signature:
    features.check_signature(query.model_signature, gallery.model_signature,
                             found_where=query_path, expected_where=gallery_path)


def _protocol_rows(name: str, splits: dict[str, saved_features.Features], *, size: str,
                   options: dict[str, Any], trials: int, seed: int
                   ) -> dict[str, dict[str, float]]:
  """The one call into the dataset table's protocols ({row name: row})."""
  # The fields of a run config's `eval` section that the protocols read.
  eval_config = ml_collections.ConfigDict(dict(
      distance=options.pop("distance"), rerank=options.pop("rerank"),
      query_block=options.pop("query_block"), vehicleid_trials=trials,
      vehicleid_seed=seed, **{key: options.pop(key)
                              for key in ("aqe", "qe_times", "qe_k", "qe_alpha")}))
  return protocols.run_protocol(datasets.spec(name).protocol, splits,
                       name=f"{name}_{size}" if size else name, eval_config=eval_config,
                       **options)


def evaluate_files(*, query: str | None = None, gallery: str | None = None,
                   test: str | None = None, protocol: str | None = None, size: str = "",
                   distance: str = "cam_squared", rerank: bool = False,
                   rerank_k1: int = 20, rerank_k2: int = 6, rerank_lambda: float = 0.3,
                   keep_junk: bool = False, query_block: int = 1024, trials: int = 10,
                   seed: int = 0, aqe: bool = False, qe_times: int = 1, qe_k: int = 5,
                   qe_alpha: float = 3.0, roc: bool = False, target_fpr: float = 1e-3,
                   roc_plot: str | None = None) -> dict[str, Any]:
  """Rows of results ({"results": {row: metrics}, ...}) for saved features.

  With `roc` (no protocol), also "roc": the verification figures (and the
  plot at `roc_plot`).
  """
  options = dict(distance=distance, rerank=rerank, query_block=query_block,
                 rerank_k1=rerank_k1, rerank_k2=rerank_k2, rerank_lambda=rerank_lambda,
                 aqe=aqe, qe_times=qe_times, qe_k=qe_k, qe_alpha=qe_alpha)
  report = {"protocol": protocol, "distance": distance, "rerank": rerank, "aqe": aqe}
  if roc and protocol is not None:
    raise ValueError("--roc is computed on --query vs --gallery without --protocol "
                     "(VeRi-776's protocol and VERI-Wild's junk_removed rows are that "
                     "same evaluation)")
  if protocol == "vehicle_id":
    report["test"] = test
    rows = _protocol_rows(protocol, {"test": _read(test, "test set")}, size=size,
                          options=options, trials=trials, seed=seed)
    return {**report, "results": rows}
  q, g = _read(query, "query set"), _read(gallery, "gallery")
  _check_same_model(q, g, query, gallery)
  report.update(query=query, gallery=gallery)
  if protocol is not None:
    rows = _protocol_rows(protocol, {"query": q, "gallery": g}, size=size,
                          options=options, trials=trials, seed=seed)
    return {**report, "results": rows}
  try:
    result = ranking.evaluate(q, g, remove_junk=not keep_junk, roc=roc,
                              roc_target_fpr=target_fpr, **options)
  except ValueError as e:
    if "no query has a true match" in str(e) and not keep_junk and (
        (q.cams == -1).all() and (g.cams == -1).all()):
      raise ValueError(f"{e}: the files have no camera ids (all -1), so every "
                       "same-id gallery item is junk; pass --keep_junk") from None
    raise
  name = f"{pathlib.Path(query).stem} vs {pathlib.Path(gallery).stem}"
  report.update(remove_junk=not keep_junk, results={name: ranking.result_row(result)})
  if roc:
    found = result["roc"]
    report["roc"] = {key: found[key] for key in (
        "num_positive", "num_negative", "tpr_at_fpr", "threshold_at_fpr",
        "fpr_at_threshold", "target_fpr", "threshold", "eer", "eer_threshold")}
    report["model_signature"] = q.model_signature
    if roc_plot:
      from musp_jax.training import figures
      figures.save_figure(figures.roc_figure(
          found, title=f"{name}: distance {distance}" + (" + AQE" if aqe else "")
          + (" + re-ranking" if rerank else "")), roc_plot)
      report["roc_plot"] = roc_plot
  return report


def _roc_table(roc: dict[str, Any], plot: str | None) -> str:
  """The verification figures as a markdown table."""
  fprs = list(roc["tpr_at_fpr"])
  lines = [f"\nVerification over {roc['num_positive']:,} same-id and "
           f"{roc['num_negative']:,} different-id pairs (accept distance < threshold):",
           "", "| | " + " | ".join(f"FPR {f}" for f in fprs) + " | EER |",
           "|---|" + "---|" * (len(fprs) + 1),
           "| TPR | " + " | ".join(f"{100 * roc['tpr_at_fpr'][f]:.2f}" for f in fprs)
           + f" | {100 * roc['eer']:.2f} |",
           "| threshold | " + " | ".join(f"{roc['threshold_at_fpr'][f]:.4g}" for f in fprs)
           + f" | {roc['eer_threshold']:.4g} |", "",
           f"Threshold for FPR {roc['target_fpr']:.0e}: {roc['threshold']:.6g}"
           + (f"; plot: {plot}" if plot else "")]
  return "\n".join(lines)


def _write_json(path: str, report: dict[str, Any]) -> None:
  text = json.dumps(report, indent=2, sort_keys=True) + "\n"
  if path == "-":
    sys.stdout.write(text)
    return
  writing.write_text(path, text)  # a failed write leaves any earlier file whole


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m musp_jax.evaluate", description=__doc__.split("\n\n")[0],
      epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--query", help="Query features (.npz).")
  parser.add_argument("--gallery", help="Gallery features (.npz).")
  parser.add_argument("--test", help="VehicleID: the whole test list's features (.npz).")
  parser.add_argument("--protocol",
                      choices=[n for n, d in datasets.DATASETS.items() if d.protocol],
                      help="A dataset's evaluation protocol (default: plain query vs "
                      "gallery, junk removed).")
  parser.add_argument("--size", default="", help="Test size named in the rows "
                      "(vehicle_id, veri_wild): small | medium | large.")
  parser.add_argument("--distance", choices=ranking.DISTANCES, default="cam_squared")
  parser.add_argument("--rerank", action="store_true",
                      help="k-reciprocal re-ranking (on the squared distance).")
  parser.add_argument("--rerank_k1", type=int, default=20)
  parser.add_argument("--rerank_k2", type=int, default=6)
  parser.add_argument("--rerank_lambda", type=float, default=0.3)
  parser.add_argument("--aqe", action="store_true",
                      help="Alpha query expansion of query and gallery (fast-reid's "
                           "TEST.AQE).")
  parser.add_argument("--qe_times", type=int, default=1)
  parser.add_argument("--qe_k", type=int, default=5)
  parser.add_argument("--qe_alpha", type=float, default=3.0)
  parser.add_argument("--roc", nargs="?", const="roc.png", default=None, metavar="PNG",
                      help="Verification figures over all pairs, and their plot here "
                           "(default roc.png).")
  parser.add_argument("--target_fpr", type=float, default=1e-3,
                      help="With --roc: the FPR whose distance threshold is reported.")
  parser.add_argument("--keep_junk", action="store_true",
                      help="Without --protocol: keep same-id same-camera gallery items.")
  parser.add_argument("--query_block", type=int, default=1024)
  parser.add_argument("--trials", type=int, default=10,
                      help="vehicle_id: random galleries averaged.")
  parser.add_argument("--seed", type=int, default=0, help="vehicle_id: split seed.")
  parser.add_argument("--json", help="Also write the results as JSON ('-': stdout).")
  cli.add_verbose_arg(parser)
  args = parser.parse_args(argv)
  if args.protocol == "vehicle_id":
    if not args.test or args.query or args.gallery:
      parser.error("--protocol vehicle_id takes --test (the whole test list; the "
                   "protocol makes the query/gallery splits), not --query/--gallery.")
  elif args.test or not (args.query and args.gallery):
    parser.error("give --query and --gallery (--test is for --protocol vehicle_id).")
  if args.roc and args.protocol:
    parser.error("--roc is computed on --query vs --gallery without --protocol "
                 "(VeRi-776's protocol and VERI-Wild's junk_removed rows are that same "
                 "evaluation).")
  if not 0.0 < args.target_fpr < 1.0:
    parser.error(f"--target_fpr {args.target_fpr}: expected a number in (0, 1).")
  if args.keep_junk and args.protocol:
    parser.error("--keep_junk: each --protocol fixes its own junk rule.")
  if args.size and args.protocol not in ("vehicle_id", "veri_wild"):
    parser.error("--size names the rows of --protocol vehicle_id or veri_wild only.")
  from musp_jax.runtime import process
  process.setup()

  def work():
    report = evaluate_files(
        query=args.query, gallery=args.gallery, test=args.test, protocol=args.protocol,
        size=args.size, distance=args.distance, rerank=args.rerank,
        rerank_k1=args.rerank_k1, rerank_k2=args.rerank_k2,
        rerank_lambda=args.rerank_lambda, keep_junk=args.keep_junk,
        query_block=args.query_block, trials=args.trials, seed=args.seed,
        aqe=args.aqe, qe_times=args.qe_times, qe_k=args.qe_k, qe_alpha=args.qe_alpha,
        roc=bool(args.roc), target_fpr=args.target_fpr, roc_plot=args.roc)
    from musp_jax.training import evaluator
    files = args.test or f"{args.query} vs {args.gallery}"
    title = (f"Saved features {files}: protocol {args.protocol or 'plain'}, distance "
             f"{args.distance}" + (" + AQE" if args.aqe else "")
             + (" + re-ranking" if args.rerank else ""))
    if args.json != "-":
      print(evaluator.markdown_table(report, title=title))
      if "roc" in report:
        print(_roc_table(report["roc"], report.get("roc_plot")))
    if args.json:
      _write_json(args.json, report)

  return cli.run(work, verbose=args.verbose)


if __name__ == "__main__":
  sys.exit(main())
