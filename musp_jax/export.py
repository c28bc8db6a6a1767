"""Ship a trained model as one file: a serialized JAX function, weights inside.

    python -m musp_jax.export --workdir workdirs/demo --out demo_model.npz

    from musp_jax import export          # imports no model code
    model = export.load("demo_model.npz")
    out = model(images_uint8_NxHxWx3)    # {"feats": (N, P, C), "areas": (N, P)}

The function takes RGB uint8 images of the exported size (any batch size) and
does the preprocessing itself: resize to the model's input size (bilinear,
antialiased when shrinking), normalise, then `features.embed` (SPEC section 4). It is a `jax.export` artefact
(StableHLO) lowered for CPU and CUDA; loading needs jax and numpy only.

The file is an .npz: "exported" (the serialized function's bytes) and "metadata"
(JSON: input shape, model signature, source checkpoint, jax version).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from musp_jax import outputs

FORMAT = "musp_jax.export/1"


def serving_fn(model, variables: Any, config, *, input_hw: tuple[int, int],
               flip: bool = False) -> Callable[[jax.Array], dict[str, jax.Array]]:
  """uint8 images (N, *input_hw, 3) -> {"feats", "areas"}; weights are closed over."""
  from musp_jax import augment  # pylint: disable=g-import-not-at-top
  from musp_jax import features  # pylint: disable=g-import-not-at-top
  mean, std = (np.asarray(v, np.float32)
               for v in augment.NORMALIZE_CONSTANTS[config.input.normalize])
  model_hw = tuple(int(v) for v in config.input.image_size)

  def fn(images_NxHxWx3: jax.Array) -> dict[str, jax.Array]:
    if images_NxHxWx3.dtype != jnp.uint8 or images_NxHxWx3.shape[1:] != (*input_hw, 3):
      raise ValueError(f"Expected uint8 images (N, {input_hw[0]}, {input_hw[1]}, 3), got "
                       f"{images_NxHxWx3.dtype} {images_NxHxWx3.shape}.")
    x = images_NxHxWx3.astype(jnp.float32) / 255.0
    if tuple(input_hw) != model_hw:
      x = jax.image.resize(x, (x.shape[0], *model_hw, 3), "bilinear", antialias=True)
    feats, areas = features.embed(variables, (x - mean) / std, model=model, flip=flip)
    return {"feats": feats, "areas": areas}

  return fn


def export(loaded, *, input_hw: tuple[int, int] | None = None, flip: bool = False,
           platforms: Sequence[str] = ("cpu", "cuda")) -> tuple[bytes, dict]:
  """A LoadedModel (musp_jax.inference.load) -> (serialized function, metadata)."""
  from musp_jax import features  # pylint: disable=g-import-not-at-top
  input_hw = tuple(int(v) for v in (input_hw or loaded.image_size))
  if len(input_hw) != 2 or min(input_hw) < 1:
    raise ValueError(f"input size {input_hw}: expected (height, width) > 0.")
  fn = serving_fn(loaded.model, loaded.variables, loaded.config, input_hw=input_hw,
                  flip=flip)
  (batch,) = jax.export.symbolic_shape("batch")
  spec = jax.ShapeDtypeStruct((batch, *input_hw, 3), jnp.uint8)
  exported = jax.export.export(jax.jit(fn), platforms=tuple(platforms))(spec)
  metadata = {
      "format": FORMAT,
      "input": {"shape": ["batch", *input_hw, 3], "dtype": "uint8", "channels": "RGB"},
      "outputs": {k: [str(d) for d in v.shape] for k, v in
                  zip(("areas", "feats"), exported.out_avals)},
      "model_signature": features.with_flip(loaded.signature, flip),
      "model_source": loaded.source,
      "platforms": list(exported.platforms),
      "jax_version": jax.__version__,
  }
  return bytes(exported.serialize()), metadata


def save(path: str, serialized: bytes, metadata: dict) -> None:
  """Writes the export atomically: a failed or killed write leaves `path` as it was."""
  with outputs.atomic_file(path) as tmp:
    np.savez(tmp, exported=np.frombuffer(serialized, np.uint8),
             metadata=np.array(json.dumps(metadata)))


class ExportedModel:
  """A loaded export: call it with uint8 images (N, H, W, 3)."""

  def __init__(self, exported: jax.export.Exported, metadata: dict):
    self.exported = exported
    self.metadata = metadata

  @property
  def input_hw(self) -> tuple[int, int]:
    return tuple(self.metadata["input"]["shape"][1:3])

  @property
  def signature(self) -> str:
    return self.metadata["model_signature"]

  def __call__(self, images_NxHxWx3: np.ndarray) -> dict[str, np.ndarray]:
    images = np.asarray(images_NxHxWx3)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (
        *self.input_hw, 3):
      raise ValueError(
          f"This export takes uint8 images (N, {self.input_hw[0]}, {self.input_hw[1]}, 3); "
          f"got {images.dtype} {images.shape}. Resize them first, or export again with "
          "--input_size.")
    out = self.exported.call(images)
    return {k: np.asarray(v) for k, v in out.items()}


def load(path: str) -> ExportedModel:
  """Reads a file written by `save` (needs jax and numpy, not the model code)."""
  with np.load(path, allow_pickle=False) as data:
    if "exported" not in data.files or "metadata" not in data.files:
      raise ValueError(f"{path} is not a musp_jax export (keys {sorted(data.files)}; "
                       "expected 'exported' and 'metadata').")
    metadata = json.loads(str(data["metadata"]))
    serialized = data["exported"].tobytes()
  if metadata.get("format") != FORMAT:
    raise ValueError(f"{path}: format {metadata.get('format')!r}, expected {FORMAT!r}.")
  return ExportedModel(jax.export.deserialize(bytearray(serialized)), metadata)


def main(argv: Sequence[str] | None = None) -> int:
  from musp_jax import embed  # pylint: disable=g-import-not-at-top
  from musp_jax import runtime  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(
      prog="python -m musp_jax.export", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  embed.add_model_args(parser)
  parser.add_argument("--out", required=True, help="Output file (.npz).")
  parser.add_argument("--input_size", type=int, nargs=2, default=None, metavar=("H", "W"),
                      help="Image size the function takes (default: the model's).")
  parser.add_argument("--flip", action="store_true", help="Flip-averaged features.")
  parser.add_argument("--platforms", nargs="+", default=["cpu", "cuda"])
  runtime.add_verbose_arg(parser)
  args = parser.parse_args(argv)
  if not args.out.endswith(".npz"):
    parser.error(f"--out {args.out}: expected a .npz path.")
  runtime.setup()
  try:
    loaded = embed.load_model(args)
    serialized, metadata = export(loaded, input_hw=args.input_size, flip=args.flip,
                                  platforms=args.platforms)
    save(args.out, serialized, metadata)
  except runtime.USER_ERRORS as e:
    runtime.print_error(e, verbose=args.verbose)
    return 2
  print(f"Wrote {args.out} ({len(serialized) / 2**20:.1f} MiB): "
        f"{json.dumps(metadata['input'])} -> {json.dumps(metadata['outputs'])}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
