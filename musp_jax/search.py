"""Search a saved gallery for the nearest images to query images.

    python -m musp_jax.embed --workdir workdirs/demo --images gallery/ --out gallery.npz
    python -m musp_jax.search --gallery gallery.npz --query photo.jpg --topk 10
    python -m musp_jax.search --gallery gallery.npz --query queries/ --json hits.json
    # millions of images: build an index once (shards streamed), then query it
    python -m musp_jax.search index --gallery day1.npz day2.npz --out city.index
    python -m musp_jax.search --index city.index --query photo.jpg --topk 10
    python -m musp_jax.search index --append --gallery day3.npz --index city.index

Queries are image files, folders, or a features .npz. Images are embedded with the
model that made the gallery (its model_source, or --workdir/--checkpoint); the
distance is the CAM-weighted one (docs/design.md section 4). Features of another model are
refused, with the differing fields named.

--gallery ranks the whole gallery by brute force in memory: exact, the default,
right for galleries that fit in memory. --index (musp_jax/retrieval/gallery_index.py) takes
candidates from an approximate index and re-ranks them with the exact distance;
with an exhaustive index (the default for galleries under 65,536 images) the
result equals brute force.

--max_distance keeps only the matches closer than a threshold: a number, or the
JSON report of `python -m musp_jax.evaluate ... --roc --json report.json`
(the threshold of its target false-positive rate, calibrated on labelled
pairs of the same model; --at_fpr picks another of its FPRs).
`search index --append` adds shards to an index without training it again.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from musp_jax.core import features
from musp_jax.serving import inference
from musp_jax.runtime import writing
from musp_jax.retrieval import ranking
from musp_jax.retrieval import saved_features
from musp_jax.retrieval import verification
from musp_jax.runtime import cli
from musp_jax.runtime import process

DISTANCES = ("cam_squared", "cam")


def load_gallery(path: str) -> tuple[saved_features.Features, str]:
  """(features, model_source) of a saved-features .npz ("" if it has no source)."""
  features = saved_features.load_features(path)
  with np.load(path, allow_pickle=False) as data:
    source = str(data["model_source"]) if "model_source" in data.files else ""
  return features, source


def query_features(queries: Sequence[str], gallery_signature: str, *,
                   gallery_path: str, gallery_source: str,
                   workdir: str | None = None, checkpoint: str | None = None,
                   step: int | None = None, batch_size: int = 32,
                   progress: bool = True) -> saved_features.Features:
  """Query features, checked to come from the gallery's model."""
  if len(queries) == 1 and queries[0].endswith(".npz"):
    query = saved_features.load_features(queries[0])
    features.check_signature(query.model_signature, gallery_signature,
                             found_where=queries[0], expected_where=gallery_path)
    return query
  model_path = workdir or checkpoint
  if model_path is None:
    if not gallery_source:
      raise ValueError(
          f"{gallery_path} does not name the model that made it (no model_source); "
          "pass --workdir or --checkpoint to embed the queries.")
    if not os.path.exists(gallery_source):
      raise FileNotFoundError(
          f"{gallery_path} was made by the model in {gallery_source}, which is not there "
          "any more (moved or deleted); pass --workdir or --checkpoint with its new place "
          "(the model is checked against the gallery's signature).")
    model_path = gallery_source
  loaded = inference.load_model(model_path, step=step)
  flip = bool(features.signature_field(gallery_signature, "flip", False))
  features.check_signature(features.with_flip(loaded.signature, flip),
                           gallery_signature, found_where=f"model {loaded.source}",
                           expected_where=gallery_path)
  return inference.embed_files(loaded, inference.list_images(queries),
                               batch_size=batch_size, flip=flip, progress=progress)


def search(query: saved_features.Features, gallery: saved_features.Features, *, topk: int = 10,
           distance: str = "cam_squared") -> list[dict[str, Any]]:
  """Per query: its top-k gallery items by ascending distance (ties: gallery order)."""
  if distance not in DISTANCES:
    raise ValueError(f"distance={distance!r}; expected one of {DISTANCES}.")
  if query.feats.shape[1:] != gallery.feats.shape[1:]:
    raise features.SignatureMismatchError(
        f"Query features are {query.feats.shape[1:]} (P, C), gallery features "
        f"{gallery.feats.shape[1:]}: they come from different models.")
  dist_QxG = ranking.distance_matrix(query, gallery, distance=distance,
                                       query_block=min(len(query), 256))
  k = min(topk, len(gallery))
  order_QxK = np.argsort(dist_QxG, axis=1, kind="stable")[:, :k]
  names = (gallery.file_names if gallery.file_names is not None
           else np.array([str(i) for i in range(len(gallery))]))
  return ranked_results(query, np.take_along_axis(dist_QxG, order_QxK, 1), order_QxK,
                        names=names, ids=gallery.ids, cams=gallery.cams)


def search_index(query: saved_features.Features, gallery_index: Any, *, topk: int = 10,
                 nprobe: int | None = None, candidates: int | None = None
                 ) -> list[dict[str, Any]]:
  """Like `search`, with candidates from a gallery_index.GalleryIndex."""
  dist_QxK, index_QxK = gallery_index.search(query, topk, nprobe=nprobe,
                                             candidates=candidates)
  return ranked_results(query, dist_QxK, index_QxK, names=gallery_index.file_names,
                        ids=gallery_index.ids, cams=gallery_index.cams)


def ranked_results(query: saved_features.Features, dist_QxK: np.ndarray, index_QxK: np.ndarray,
                   *, names: np.ndarray, ids: np.ndarray, cams: np.ndarray
                   ) -> list[dict[str, Any]]:
  """The per-query result records of ranked gallery indices (-1: none found)."""
  results = []
  for q, (row_d, row_g) in enumerate(zip(dist_QxK, index_QxK)):
    row_g = row_g[row_g >= 0]
    results.append({
        "query": str(query.file_names[q]) if query.file_names is not None else str(q),
        "results": [{"rank": r + 1, "file_name": str(names[g]), "distance": float(row_d[r]),
                     "gallery_index": int(g), "vehicle_id": int(ids[g]),
                     "camera_id": int(cams[g])}
                    for r, g in enumerate(row_g)],
    })
  return results


def max_distance(value: str, *, at_fpr: float | None, signature: str,
                 distance: str) -> float:
  """--max_distance: a number, or a verification report's threshold, calibrated on
  the same model and distance without re-ranking or query expansion."""
  try:
    return float(value)
  except ValueError:
    pass
  threshold, report = verification.read_threshold(value, fpr=at_fpr)
  if report.get("distance") != distance or report.get("rerank") or report.get("aqe"):
    modes = [m for m in ("rerank", "aqe") if report.get(m)]
    raise ValueError(
        f"{value}: its threshold is for distance {report.get('distance')!r}"
        + (f" with {' and '.join(modes)}" if modes else "") + f"; this search ranks by "
        f"{distance!r} alone: calibrate with `evaluate --distance {distance} --roc` "
        "(no --rerank, no --aqe)")
  found = str(report.get("model_signature") or "")
  if found and signature:
    features.check_signature(found, signature, found_where=value,
                             expected_where="the gallery")
  return threshold


def within(results: list[dict[str, Any]], limit: float) -> list[dict[str, Any]]:
  """The results with only the matches closer than `limit` (distance < limit)."""
  return [{**res, "results": [r for r in res["results"] if r["distance"] < limit]}
          for res in results]


def format_table(results: list[dict[str, Any]]) -> str:
  """A plain-text table per query: rank, distance, file name (and id if known)."""
  lines = []
  for res in results:
    lines.append(f"query: {res['query']}")
    width = max([len("file")] + [len(r["file_name"]) for r in res["results"]])
    lines.append(f"  {'rank':>4}  {'distance':>10}  {'file':<{width}}  id")
    for r in res["results"]:
      vid = r["vehicle_id"] if r["vehicle_id"] >= 0 else "-"
      lines.append(f"  {r['rank']:>4}  {r['distance']:>10.4f}  "
                   f"{r['file_name']:<{width}}  {vid}")
    lines.append("")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] == ["index"]:
    return build_index_main(argv[1:])
  parser = argparse.ArgumentParser(
      prog="python -m musp_jax.search", description=__doc__.split("\n\n")[0],
      epilog="Build an index: python -m musp_jax.search index --help",
      formatter_class=argparse.RawDescriptionHelpFormatter)
  where = parser.add_mutually_exclusive_group(required=True)
  where.add_argument("--gallery", help="Saved-features .npz (embed's --out): brute force.")
  where.add_argument("--index", help="Index folder (`python -m musp_jax.search index`).")
  parser.add_argument("--query", nargs="+", required=True,
                      help="Image files, folders, or one features .npz.")
  parser.add_argument("--topk", type=int, default=10)
  parser.add_argument("--distance", choices=DISTANCES, default="cam_squared",
                      help="cam_squared: official code; cam: paper text (--gallery only).")
  parser.add_argument("--nprobe", type=int, default=None,
                      help="With --index: inverted lists scanned (default: the index's).")
  parser.add_argument("--candidates", type=int, default=None,
                      help="With --index: candidates re-ranked per pass (default: 2 x "
                           "--topk).")
  parser.add_argument("--max_distance", default=None, metavar="NUMBER|REPORT.json",
                      help="Keep only matches closer than this: a distance, or the "
                           "threshold in `evaluate --roc --json` output.")
  parser.add_argument("--at_fpr", type=float, default=None,
                      help="With a report as --max_distance: the FPR whose threshold to "
                           "use (default: the report's target).")
  parser.add_argument("--verify_index", action="store_true",
                      help="With --index: also check the feature store's SHA-256.")
  parser.add_argument("--json", default=None,
                      help="Also write the results as JSON here ('-': JSON to stdout "
                           "instead of the table).")
  parser.add_argument("--batch_size", type=int, default=32)
  inference.add_model_args(parser, required=False)
  cli.add_verbose_arg(parser)
  args = parser.parse_args(argv)
  if args.topk < 1:
    parser.error(f"--topk {args.topk}: expected >= 1.")
  if args.index is None and (args.nprobe or args.candidates or args.verify_index):
    parser.error("--nprobe, --candidates and --verify_index need --index.")
  if args.at_fpr is not None and args.max_distance is None:
    parser.error("--at_fpr picks a threshold from a report given as --max_distance.")
  if args.index is not None and args.distance != "cam_squared":
    parser.error("--index ranks by the cam_squared distance only.")
  process.setup()
  return cli.run(lambda: _search_and_print(args), verbose=args.verbose)


def _search_and_print(args: argparse.Namespace) -> None:
  """The command's work: open the gallery, embed the queries, rank, filter, print/write."""
  if args.index is None:
    gallery, source = load_gallery(args.gallery)
    signature = gallery.model_signature
  else:
    from musp_jax.retrieval import gallery_index as index_lib
    gallery = index_lib.GalleryIndex(args.index, verify_features=args.verify_index)
    signature, source = gallery.model_signature, gallery.model_source
  query = query_features(args.query, signature, gallery_path=args.gallery or args.index,
                         gallery_source=source, workdir=args.workdir,
                         checkpoint=args.checkpoint, step=args.step,
                         batch_size=args.batch_size)
  limit = None
  if args.max_distance is not None:
    limit = max_distance(args.max_distance, at_fpr=args.at_fpr, signature=signature,
                         distance=args.distance)
  if args.index is None:
    results = search(query, gallery, topk=args.topk, distance=args.distance)
  else:
    results = search_index(query, gallery, topk=args.topk, nprobe=args.nprobe,
                           candidates=args.candidates)
  if limit is not None:
    results = within(results, limit)
  payload = {"gallery": args.gallery or args.index, "distance": args.distance,
             "topk": args.topk, "queries": results}
  if limit is not None:
    payload["max_distance"] = limit
  if args.json == "-":
    print(json.dumps(payload, indent=2))
    return
  print(format_table(results))
  if args.json:
    writing.write_text(args.json, json.dumps(payload, indent=2))


def build_index_main(argv: Sequence[str]) -> int:
  """`python -m musp_jax.search index`: builds an index folder from .npz shards, or
  appends shards to one."""
  parser = argparse.ArgumentParser(
      prog="python -m musp_jax.search index",
      description="Build an approximate index (musp_jax.retrieval.gallery_index) over "
                  "saved-features .npz shards, streamed one at a time; or --append "
                  "shards to one.")
  parser.add_argument("--gallery", nargs="+", required=True,
                      help="Saved-features .npz shards (embed's --out), in order.")
  parser.add_argument("--out", help="Index folder to write.")
  parser.add_argument("--append", action="store_true",
                      help="Add the shards to the existing --index without training it "
                           "again (atomic: a killed append leaves it as it was).")
  parser.add_argument("--index", help="With --append: the index folder to grow.")
  parser.add_argument("--quantizer_from", default=None, metavar="INDEX",
                      help="Build with the trained quantizer of this index (same model) "
                           "instead of training one.")
  parser.add_argument("--codec", choices=("auto", "flat", "sq8", "pq"), default="auto",
                      help="Codes in memory: flat (exact scores, 4 B a dimension), sq8 "
                           "(1 B), pq (1 B per --pq_dims); auto: sq8 from 65,536 "
                           "images, else flat.")
  parser.add_argument("--nlist", type=int, default=None, help="Inverted lists (auto).")
  parser.add_argument("--pq_dims", type=int, default=4,
                      help="Dimensions per PQ code byte (--codec pq).")
  parser.add_argument("--nprobe", type=int, default=None,
                      help="Default lists scanned per query (auto: all for flat).")
  parser.add_argument("--store", choices=("float32", "float16"), default="float32",
                      help="Feature store dtype for the exact re-ranking.")
  parser.add_argument("--overwrite", action="store_true",
                      help="Replace --out if it is an index folder.")
  cli.add_verbose_arg(parser)
  args = parser.parse_args(argv)
  if args.append:
    if not args.index or args.out:
      parser.error("--append grows --index (the existing folder); --out is for a build.")
    building_only = [f"--{name}" for name in ("codec", "nlist", "pq_dims", "nprobe",
                                              "store", "quantizer_from", "overwrite")
                     if getattr(args, name) != parser.get_default(name)]
    if building_only:
      parser.error(f"{', '.join(building_only)}: the index keeps its own parameters "
                   "when shards are appended.")
  elif not args.out or args.index:
    parser.error("give --out (the index folder to build), or --append --index FOLDER.")
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  return cli.run(lambda: _build_and_print(args), verbose=args.verbose)


def _build_and_print(args: argparse.Namespace) -> None:
  from musp_jax.retrieval import gallery_index as index_lib
  if args.append:
    before = len(index_lib.GalleryIndex(args.index))
    out = index_lib.append(args.index, args.gallery)
  else:
    spec = index_lib.Spec(nlist=args.nlist, codec=args.codec, pq_dims=args.pq_dims,
                          nprobe=args.nprobe, store=args.store)
    out = index_lib.build_index(args.gallery, args.out, spec, overwrite=args.overwrite,
                                quantizer_from=args.quantizer_from)
  built = index_lib.GalleryIndex(out)
  params = built.params
  mode = f"{'exact' if built.exhaustive() else 'approximate'} by default"
  if args.append:
    print(f"Appended {len(built) - before} images from {len(args.gallery)} shard(s) to "
          f"{out}: {len(built)} images, {params['factory']} trained on "
          f"{params['train_size']} (nprobe {params['nprobe']}, {mode}).")
  else:
    print(f"Wrote {out}: {len(built)} images from {len(args.gallery)} shard(s), "
          f"{params['factory']} (nprobe {params['nprobe']}, {mode}).")

if __name__ == "__main__":
  sys.exit(main())
