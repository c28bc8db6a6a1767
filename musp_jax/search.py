"""Search a saved gallery for the nearest images to query images.

    python -m musp_jax.embed --workdir workdirs/demo --images gallery/ --out gallery.npz
    python -m musp_jax.search --gallery gallery.npz --query photo.jpg --topk 10
    python -m musp_jax.search --gallery gallery.npz --query queries/ --json hits.json

Queries are image files, folders, or a features .npz. Images are embedded with the
model that made the gallery (its model_source, or --workdir/--checkpoint); the
distance is the CAM-weighted one (SPEC section 4). Features of another model are
refused, with the differing fields named.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from musp_jax import embed as embed_lib
from musp_jax import features
from musp_jax import inference
from musp_jax import outputs
from musp_jax import retrieval
from musp_jax import runtime

DISTANCES = ("cam_squared", "cam")


def load_gallery(path: str) -> tuple[retrieval.Features, str]:
  """(features, model_source) of a saved-features .npz ("" if it has no source)."""
  features = retrieval.load_features(path)
  with np.load(path, allow_pickle=False) as data:
    source = str(data["model_source"]) if "model_source" in data.files else ""
  return features, source


def query_features(queries: Sequence[str], gallery: retrieval.Features, *,
                   gallery_path: str, gallery_source: str,
                   workdir: str | None = None, checkpoint: str | None = None,
                   step: int | None = None, batch_size: int = 32,
                   progress: bool = True) -> retrieval.Features:
  """Query features, checked to come from the gallery's model."""
  if len(queries) == 1 and queries[0].endswith(".npz"):
    query = retrieval.load_features(queries[0])
    features.check_signature(query.model_signature, gallery.model_signature,
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
  loaded = inference.load(model_path, step=step)
  flip = bool(features.signature_field(gallery.model_signature, "flip", False))
  features.check_signature(features.with_flip(loaded.signature, flip),
                           gallery.model_signature, found_where=f"model {loaded.source}",
                           expected_where=gallery_path)
  return inference.embed_files(loaded, inference.list_images(queries),
                               batch_size=batch_size, flip=flip, progress=progress)


def search(query: retrieval.Features, gallery: retrieval.Features, *, topk: int = 10,
           distance: str = "cam_squared") -> list[dict[str, Any]]:
  """Per query: its top-k gallery items by ascending distance (ties: gallery order)."""
  if distance not in DISTANCES:
    raise ValueError(f"distance={distance!r}; expected one of {DISTANCES}.")
  if query.feats.shape[1:] != gallery.feats.shape[1:]:
    raise features.SignatureMismatchError(
        f"Query features are {query.feats.shape[1:]} (P, C), gallery features "
        f"{gallery.feats.shape[1:]}: they come from different models.")
  dist_QxG = retrieval.distance_matrix(query, gallery, distance=distance,
                                       query_block=min(len(query), 256))
  k = min(topk, len(gallery))
  names = (gallery.file_names if gallery.file_names is not None
           else np.array([str(i) for i in range(len(gallery))]))
  results = []
  for q, row in enumerate(dist_QxG):
    order = np.argsort(row, kind="stable")[:k]
    results.append({
        "query": str(query.file_names[q]) if query.file_names is not None else str(q),
        "results": [{"rank": r + 1, "file_name": str(names[g]), "distance": float(row[g]),
                     "gallery_index": int(g), "vehicle_id": int(gallery.ids[g]),
                     "camera_id": int(gallery.cams[g])}
                    for r, g in enumerate(order)],
    })
  return results


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
  parser = argparse.ArgumentParser(
      prog="python -m musp_jax.search", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--gallery", required=True, help="Saved-features .npz (embed's --out).")
  parser.add_argument("--query", nargs="+", required=True,
                      help="Image files, folders, or one features .npz.")
  parser.add_argument("--topk", type=int, default=10)
  parser.add_argument("--distance", choices=DISTANCES, default="cam_squared",
                      help="cam_squared: official code; cam: paper text.")
  parser.add_argument("--json", default=None,
                      help="Also write the results as JSON here ('-': JSON to stdout "
                           "instead of the table).")
  parser.add_argument("--batch_size", type=int, default=32)
  embed_lib.add_model_args(parser, required=False)
  runtime.add_verbose_arg(parser)
  args = parser.parse_args(argv)
  if args.topk < 1:
    parser.error(f"--topk {args.topk}: expected >= 1.")
  runtime.setup()
  try:
    gallery, source = load_gallery(args.gallery)
    query = query_features(args.query, gallery, gallery_path=args.gallery,
                           gallery_source=source, workdir=args.workdir,
                           checkpoint=args.checkpoint, step=args.step,
                           batch_size=args.batch_size)
    results = search(query, gallery, topk=args.topk, distance=args.distance)
    payload = {"gallery": args.gallery, "distance": args.distance, "topk": args.topk,
               "queries": results}
    if args.json == "-":
      print(json.dumps(payload, indent=2))
      return 0
    print(format_table(results))
    if args.json:
      outputs.write_text(args.json, json.dumps(payload, indent=2))
  except runtime.USER_ERRORS as e:
    runtime.print_error(e, verbose=args.verbose)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
