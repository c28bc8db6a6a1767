"""Embed a folder of images with a trained model into a saved-features file.

    python -m musp_jax.embed --workdir workdirs/demo --images photos/ --out feats.npz
    python -m musp_jax.embed --checkpoint workdirs/demo/checkpoints/120 \\
        --images a.jpg b.jpg --out feats.npz --flip

The .npz has saved_features.save_features' keys (feats (N, P, C) L2-normalised
per branch, areas (N, P), vehicle_id and camera_id (-1: unknown), file_name,
model_signature) plus model_source, the checkpoint it was made with, which
`musp_jax.search` uses to embed queries with the same model.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import numpy as np

from musp_jax.serving import inference
from musp_jax.retrieval import saved_features
from musp_jax.runtime import cli
from musp_jax.runtime import process


def write_features(loaded: inference.LoadedModel, images: Sequence[str], out: str, *,
                   batch_size: int = 32, flip: bool = False, progress: bool = True
          ) -> saved_features.Features:
  """Embeds image files/folders and writes `out` (.npz); returns the features."""
  files = inference.list_images(images)
  features = inference.embed_files(loaded, files, batch_size=batch_size, flip=flip,
                                   progress=progress)
  saved_features.save_features(out, features, model_source=np.array(loaded.source))
  return features


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m musp_jax.embed", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  inference.add_model_args(parser)
  parser.add_argument("--images", nargs="+", required=True,
                      help="Image files and/or folders (searched recursively).")
  parser.add_argument("--out", required=True, help="Output .npz.")
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--flip", action="store_true",
                      help="Average the features of each image and its mirror image.")
  cli.add_verbose_arg(parser)
  args = parser.parse_args(argv)
  if not args.out.endswith(".npz"):
    parser.error(f"--out {args.out}: expected a .npz path.")
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  process.setup()

  def work():
    loaded = inference.model_from_args(args)
    features = write_features(loaded, args.images, args.out, batch_size=args.batch_size,
                              flip=args.flip)
    print(f"Wrote {args.out}: {len(features)} images, feats {features.feats.shape[1:]} "
          f"(P, C), model {loaded.source}.")

  return cli.run(work, verbose=args.verbose)


if __name__ == "__main__":
  sys.exit(main())
