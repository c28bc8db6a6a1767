"""Converts PyTorch weights into an Orbax checkpoint for config.model.init_from.

    python -m musp_jax.import_weights --torchvision resnet50.pth --out weights/resnet50
    python -m musp_jax.import_weights --musp model.pth.tar --out weights/musp_veri

--torchvision: an ImageNet ResNet state dict (.pth, or .npz / .safetensors
without torch); the depth is read from its layout, `fc.*` is dropped. The
checkpoint holds the backbone only; the head starts fresh.
--musp: a whole official-MUSP training checkpoint (backbone + head). The model
settings it implies (n, c, ESE, global branch or not, classes, and pooling
"official", the official code's at any input size) are printed as config
overrides and recorded in the checkpoint's metadata; the training/eval config
must use them.
"""

import argparse
from collections.abc import Sequence
import os
import shutil
import sys

import jax
import jax.numpy as jnp

from configs import common
from musp_jax.models import build_model
from musp_jax.models import resnet
from musp_jax.models import weights

_PROBE_SHAPE = (1, 64, 64, 3)  # parameter shapes do not depend on image size


def _log(msg: str) -> None:
  print(f"[import_weights] {msg}", file=sys.stderr, flush=True)


def import_torchvision(path: str, out: str) -> dict:
  """torchvision ResNet -> backbone-only Orbax checkpoint; returns metadata."""
  _log(f"reading {path}")
  state_dict = weights.load_state_dict(path)
  depth = weights.resnet_depth(state_dict)
  _log(f"ResNet-{depth}: {len(state_dict)} tensors")
  template = jax.eval_shape(
      lambda: resnet.ResNet(depth).init(jax.random.key(0),
                                        jnp.zeros(_PROBE_SHAPE)))
  backbone = weights.import_resnet(state_dict, template, ignore=("fc.",),
                                   what=path)
  variables = {col: {"backbone": tree} for col, tree in backbone.items()}
  metadata = {"kind": "backbone", "source": os.path.abspath(path),
              "depth": depth}
  weights.save_init(out, variables, metadata)
  return metadata


def import_musp(path: str, out: str) -> dict:
  """Official MUSP checkpoint -> whole-model Orbax checkpoint; returns metadata."""
  _log(f"reading {path}")
  state_dict = weights.load_state_dict(path)
  shapes = weights.musp_checkpoint_shapes(state_dict)
  num_classes = shapes.pop("num_classes")
  model_config = common.get_config().model
  model_config.update(shapes)
  _log(f"MUSP model: {dict(shapes)}, {num_classes} classes")
  model = build_model(model_config, num_classes)
  template = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros(_PROBE_SHAPE)))
  variables = weights.import_musp(state_dict, template, what=path)
  metadata = {"kind": "model", "source": os.path.abspath(path),
              "num_classes": num_classes, "model": shapes}
  weights.save_init(out, variables, metadata)
  overrides = " ".join(f"--config.model.{k}={v}" for k, v in shapes.items())
  _log(f"use with: --config.model.init_from={os.path.abspath(out)} "
       f"{overrides} (and a dataset with {num_classes} training ids)")
  return metadata


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--torchvision", metavar="PATH",
                      help="torchvision ResNet state dict")
  source.add_argument("--musp", metavar="PATH",
                      help="official MUSP checkpoint (backbone + head)")
  parser.add_argument("--out", required=True, help="output Orbax directory")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace --out if it exists")
  args = parser.parse_args(argv)
  out = os.path.abspath(args.out)
  if os.path.exists(out):
    if not args.overwrite:
      parser.error(f"--out {out} exists; pass --overwrite to replace it")
    shutil.rmtree(out)
  if args.torchvision:
    import_torchvision(args.torchvision, out)
  else:
    import_musp(args.musp, out)
  _log(f"wrote {out}")


if __name__ == "__main__":
  main()
