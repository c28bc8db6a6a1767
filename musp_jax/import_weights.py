"""Converts PyTorch weights into a workdir for config.model.init_from and the tools.

    python -m musp_jax.import_weights --torchvision resnet50.pth --out weights/resnet50
    python -m musp_jax.import_weights --ibn resnet50_ibn_a-d9d0bb7b.pth --out weights/r50_ibn_a
    python -m musp_jax.import_weights --musp model.pth.tar --out weights/musp_veri

The output folder is written as a training run's step 0 (--out/checkpoints/0), read
by the one weights loader: `--config.model.init_from=OUT` starts training from it, and
`python -m musp_jax.main --mode=eval --workdir OUT --config ...` evaluates it (the
config gives what weights cannot: image size, dataset, evaluation settings).

--torchvision: an ImageNet ResNet state dict (.pth, or .npz / .safetensors
without torch); the depth is read from its layout, `fc.*` is dropped. The
checkpoint holds the backbone only; the head starts fresh.
--ibn: a ResNet-IBN-a state dict, from the IBN-Net release (ImageNet weights,
`fc.*` dropped) or a fast-reid model (`model_final.pth`: its `backbone.*`, the heads
dropped); the backbone only, for model.backbone=resnet_ibn_a.
--musp: a whole official-MUSP training checkpoint (backbone + head). The model
settings it implies (n, c, ESE, global branch or not, classes, and pooling
"official", the official code's at any input size) are printed as config
overrides and recorded in the checkpoint's metadata; the training/eval config
must use them.
"""

import argparse
from collections.abc import Sequence
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp

from musp_jax.runtime import cli
from musp_jax.runtime import process
from musp_jax.runtime import writing
from musp_jax.training import checkpointing
from musp_jax.models import musp
from musp_jax.models import resnet
from musp_jax.models import weights

_PROBE_SHAPE = (1, 64, 64, 3)  # parameter shapes do not depend on image size
_WHAT = "a folder written by import_weights"


def _log(msg: str) -> None:
  print(f"[import_weights] {msg}", file=sys.stderr, flush=True)


def convert_backbone(path: str, backbone: str = "resnet") -> tuple[dict[str, Any], dict]:
  """A torchvision ResNet (backbone "resnet") or an IBN-Net / fast-reid ResNet-IBN-a
  ("resnet_ibn_a") -> (backbone-only variables, metadata); writes nothing."""
  _log(f"reading {path}")
  state_dict = weights.load_state_dict(path)
  if backbone == "resnet_ibn_a":
    state_dict = weights.ibn_backbone(state_dict, what=path)
  elif weights.is_ibn_a(state_dict):
    raise weights.WeightImportError(
        f"{path} is a ResNet-IBN-a state dict ({weights.IBN_MARKER}); import it with --ibn")
  depth = weights.resnet_depth(state_dict, what=path)
  name = f"ResNet-{depth}" + ("-IBN-a" if backbone == "resnet_ibn_a" else "")
  _log(f"{name}: {len(state_dict)} tensors")
  template = jax.eval_shape(
      lambda: resnet.ResNet(depth, backbone=backbone).init(jax.random.key(0),
                                                           jnp.zeros(_PROBE_SHAPE)))
  imported = weights.import_resnet(state_dict, template, ignore=("fc.",),
                                   what=path)
  variables = {col: {"backbone": tree} for col, tree in imported.items()}
  metadata = {"kind": "backbone", "source": os.path.abspath(path),
              "model": {"depth": depth, "backbone": backbone}, "num_classes": 0}
  return variables, metadata


def convert_musp(path: str) -> tuple[dict[str, Any], dict]:
  """Official MUSP checkpoint -> (whole-model variables, metadata); writes nothing."""
  _log(f"reading {path}")
  state_dict = weights.load_state_dict(path)
  shapes = weights.musp_checkpoint_shapes(state_dict, what=path)
  num_classes = shapes.pop("num_classes")
  _log(f"MUSP model: {dict(shapes)}, {num_classes} classes")
  # The shapes fix every parameter; what they cannot tell (softmax attention, the value
  # map's mean as the global feature) is the official head's, MUSPHead's defaults.
  head_fields = {k: v for k, v in shapes.items() if k != "depth"}
  model = musp.ReIDModel(backbone=resnet.ResNet(shapes["depth"]),
                         head=musp.MUSPHead(num_classes, **head_fields))
  template = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros(_PROBE_SHAPE)))
  variables = weights.import_musp(state_dict, template, what=path)
  metadata = {"kind": "model", "source": os.path.abspath(path),
              "num_classes": num_classes, "model": {"head": "musp", **shapes}}
  return variables, metadata


def write(out: str, variables: dict[str, Any], metadata: dict, *,
          overwrite: bool = False) -> None:
  """Writes the init checkpoint into a temporary folder, then swaps it in for `out`.

  An existing `out` is replaced only with `overwrite`, and only if import_weights
  wrote it; a training workdir or any other folder is refused.
  """
  source = {"kind": metadata["kind"], "source": metadata["source"]}
  writing.replace_folder(
      out, lambda tmp: checkpointing.save_imported(
          tmp, variables, model=metadata["model"], num_classes=metadata["num_classes"],
          source=source),
      owned=_written_here, what=_WHAT, overwrite=overwrite)


def _written_here(path: str) -> bool:
  return checkpointing.imported_from(path) is not None


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m musp_jax.import_weights", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--torchvision", metavar="PATH",
                      help="torchvision ResNet state dict")
  source.add_argument("--ibn", metavar="PATH",
                      help="ResNet-IBN-a state dict (IBN-Net release or fast-reid model)")
  source.add_argument("--musp", metavar="PATH",
                      help="official MUSP checkpoint (backbone + head)")
  parser.add_argument("--out", required=True,
                      help="output folder (a workdir holding the weights as step 0)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace --out if import_weights wrote it")
  cli.add_verbose_arg(parser)
  args = parser.parse_args(argv)
  process.setup()
  return cli.run(lambda: import_to(args), verbose=args.verbose)


def import_to(args: argparse.Namespace) -> None:
  """The command's work: checks --out, reads and converts the source, writes --out."""
  out = os.path.abspath(args.out)
  # Refused outputs fail before the source is read; the source is read and
  # converted before anything is written.
  writing.check_replaceable(out, owned=_written_here, what=_WHAT,
                            overwrite=args.overwrite)
  if args.torchvision:
    variables, metadata = convert_backbone(args.torchvision)
  elif args.ibn:
    variables, metadata = convert_backbone(args.ibn, "resnet_ibn_a")
  else:
    variables, metadata = convert_musp(args.musp)
  write(out, variables, metadata, overwrite=args.overwrite)
  _log(f"wrote {out}")
  if metadata["model"].get("backbone") == "resnet_ibn_a":
    _log(f"use with: --config.model.init_from={out} --config.model.backbone=resnet_ibn_a "
         f"--config.model.depth={metadata['model']['depth']}")
  if metadata["kind"] == "model":
    overrides = " ".join(f"--config.model.{k}={v}" for k, v in metadata["model"].items()
                         if k != "head")
    _log(f"use with: --config.model.init_from={out} {overrides} (and a dataset with "
         f"{metadata['num_classes']} training ids)")

if __name__ == "__main__":
  sys.exit(main())
