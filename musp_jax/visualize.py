"""Pictures of a trained model: attention maps and rank lists.

    python -m musp_jax.visualize attention --workdir workdirs/demo [--images a.jpg dir/]
    python -m musp_jax.visualize ranks --workdir workdirs/demo --order worst --topk 8
    python -m musp_jax.visualize demo --workdir workdirs/demo     # all, for `make demo`

attention: one row per image, the image then each attention map laid over it
(the paper's Figure 5); the background map is framed and titled in red. Each
title gives the share of the image the map covers. Without --images, the first
query images of the workdir's evaluation dataset are shown.

On a dataset with ground-truth part masks (synthetic_vehicles), `demo` also draws
attention_parts.png: per row the image, its ground-truth part map, then each
map over the image with the share of its mass on the vehicle in that image
(musp_jax/training/attention_scores.py defines the scores).

ranks: query images of the evaluation dataset and their top-k gallery images,
after the protocol's junk removal (same id and camera); green frame: same
vehicle, red: another one; distances printed. The choice of queries (worst or
best AP, random, or given indices) is in the file name and the title.

Pictures go to <workdir>/pictures/ unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from etils import epath

from musp_jax.data import augment
from musp_jax.runtime import cli
from musp_jax.runtime import process
from musp_jax.serving import inference
from musp_jax.training import model_pictures


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m musp_jax.visualize", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  att = sub.add_parser("attention", help="Attention maps over images.")
  inference.add_model_args(att)
  att.add_argument("--images", nargs="+", default=None,
                   help="Image files/folders (default: evaluation query images).")
  att.add_argument("--num_images", type=int, default=6)
  att.add_argument("--out", default=None,
                   help="PNG path (default: <workdir>/pictures/attention.png).")
  att.add_argument("--data_dir", default=None, help="Override config.dataset.data_dir.")
  rk = sub.add_parser("ranks", help="Rank lists of evaluation queries.")
  inference.add_model_args(rk)
  rk.add_argument("--order", choices=model_pictures.ORDERS, default="worst")
  rk.add_argument("--queries", type=int, nargs="+", default=None,
                  help="Query indices to show (instead of --order).")
  rk.add_argument("--num_queries", type=int, default=4)
  rk.add_argument("--topk", type=int, default=8)
  rk.add_argument("--seed", type=int, default=0, help="For --order random.")
  rk.add_argument("--out_dir", default=None,
                  help="Folder for ranks_<order>_top<k>.png (default: <workdir>/pictures).")
  rk.add_argument("--data_dir", default=None, help="Override config.dataset.data_dir.")
  rk.add_argument("--batch_size", type=int, default=None,
                  help="Override config.eval.batch_size (a multiple of the device count).")
  demo = sub.add_parser("demo", help="Attention grid + worst-AP rank lists of a workdir.")
  demo.add_argument("--workdir", required=True)
  demo.add_argument("--data_dir", default=None, help="Override config.dataset.data_dir.")
  for sub_parser in (att, rk, demo):
    cli.add_verbose_arg(sub_parser)
  args = parser.parse_args(argv)
  process.setup()
  return cli.run(lambda: _draw(args), verbose=args.verbose)


def _draw(args: argparse.Namespace) -> None:
  """The command's work: load the model, draw, print the written paths as JSON."""
  if args.command == "demo":
    loaded = inference.load_model(args.workdir).with_overrides(data_dir=args.data_dir)
    written = model_pictures.demo_pictures(loaded, str(epath.Path(args.workdir) / "pictures"))
  else:
    loaded = inference.model_from_args(args).with_overrides(
        data_dir=args.data_dir, eval_batch_size=getattr(args, "batch_size", None))
    pictures = epath.Path(loaded.source).parent.parent / "pictures"
    if args.command == "attention":
      images = names = None
      if args.images:
        model_pictures.require_attention(loaded.config)  # before reading any image
        files = inference.list_images(args.images)[:args.num_images]
        images = [augment.decode(epath.Path(p).read_bytes(), where=p) for _, p in files]
        names = [name for name, _ in files]
      written = [model_pictures.attention_picture(
          loaded, args.out or str(pictures / "attention.png"), images=images, names=names,
          num_images=args.num_images)]
    else:
      written = [model_pictures.ranks_picture(
          loaded, args.out_dir or str(pictures), order=args.order, queries=args.queries,
          num_queries=args.num_queries, topk=args.topk, seed=args.seed)]
  print(json.dumps({"written": written}))

if __name__ == "__main__":
  sys.exit(main())
