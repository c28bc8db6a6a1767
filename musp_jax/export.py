"""Ship a trained model as one file: a serialized JAX function or an ONNX model.

    python -m musp_jax.export --workdir workdirs/demo --out demo_model.npz
    python -m musp_jax.export --workdir workdirs/demo --out demo_model.onnx --format onnx

    from musp_jax import export          # imports no model code
    model = export.load("demo_model.npz")
    out = model(images_uint8_NxHxWx3)    # {"feats": (N, P, C), "areas": (N, P)}

    import onnxruntime as ort            # needs neither JAX nor this package
    session = ort.InferenceSession("demo_model.onnx")
    feats, areas = session.run(["feats", "areas"], {"images": images_uint8_NxHxWx3})

Both take RGB uint8 images of the exported size (any batch size) and do the
preprocessing themselves: resize to the model's input size (bilinear,
antialiased when shrinking), then the one feature function `features.embed`,
which normalises as training and evaluation do (docs/design.md section 4). Both are built
from one function, `serving_fn`.

jax format: a `jax.export` artefact (StableHLO) lowered for CPU and CUDA;
loading needs jax and numpy only. The file is an .npz: "exported" (the
serialized function's bytes) and "metadata" (JSON: input shape, model
signature, source checkpoint, jax version).

onnx format (opset 17, dynamic batch; for onnxruntime, TensorRT, DeepStream):
the jaxpr of `serving_fn` is written primitive by primitive as ONNX operators
by `musp_jax.serving.onnx_lowering`, weights and everything else that does not depend on the
images folded into constants; the same metadata is in the model's
metadata_props["musp_jax"]. Why our own lowering rather than a converter
library (both tried with jax 0.10.2):
  * jax2onnx 0.17.1 rewrites flax.linen layers at trace time; its nn.max_pool
    replacement takes only "SAME"/"VALID" padding, while the torchvision stem
    pools with explicit ((1, 1), (1, 1)) padding (it fails, and a keyword call
    would silently pool without padding); converting the traced primitives
    instead fails on the symbolic batch (its lax.pad rule needs static
    shapes). It also pins orbax-checkpoint < 0.11.37, below what we use.
  * jax2tf (jax 0.10) emits only native serialization, one XlaCallModule op
    holding StableHLO, which tf2onnx 1.17 cannot convert.
The lowering covers the primitives this model uses and names any other. The
command checks the ONNX model with onnxruntime against the JAX function on
random images and refuses to write it if they differ by more than 1e-4
(relative, per feature vector): ONNX exports that silently differ from the
framework are a known failure of re-ID deployments.
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

from musp_jax.runtime import writing

FORMAT = "musp_jax.export/1"
ONNX_FORMAT = "musp_jax.onnx/1"
FORMATS = ("jax", "onnx")
PARITY_TOLERANCE = 1e-4  # ONNX vs JAX, relative per feature vector


def serving_fn(model, variables: Any, config, *, input_hw: tuple[int, int],
               flip: bool = False) -> Callable[[jax.Array], dict[str, jax.Array]]:
  """uint8 images (N, *input_hw, 3) -> {"feats", "areas"}; weights are closed over."""
  from musp_jax.core import features
  model_hw = tuple(int(v) for v in config.input.image_size)

  def fn(images_NxHxWx3: jax.Array) -> dict[str, jax.Array]:
    if images_NxHxWx3.dtype != jnp.uint8 or images_NxHxWx3.shape[1:] != (*input_hw, 3):
      raise ValueError(f"Expected uint8 images (N, {input_hw[0]}, {input_hw[1]}, 3), got "
                       f"{images_NxHxWx3.dtype} {images_NxHxWx3.shape}.")
    pixels = images_NxHxWx3
    if tuple(input_hw) != model_hw:
      # Resizing commutes with the per-channel affine normalisation (its weights sum
      # to 1), so it runs on pixel values and `embed` normalises as everywhere else.
      pixels = jax.image.resize(pixels.astype(jnp.float32), (pixels.shape[0], *model_hw, 3),
                                "bilinear", antialias=True)
    feats, areas = features.embed(variables, pixels, model=model, flip=flip,
                                  normalize=config.input.normalize)
    return {"feats": feats, "areas": areas}

  return fn


def _input_hw(loaded, input_hw) -> tuple[int, int]:
  input_hw = tuple(int(v) for v in (input_hw or loaded.image_size))
  if len(input_hw) != 2 or min(input_hw) < 1:
    raise ValueError(f"input size {input_hw}: expected (height, width) > 0.")
  return input_hw


def _metadata(loaded, fmt: str, input_hw: tuple[int, int], flip: bool,
              outputs: dict[str, list[str]]) -> dict:
  from musp_jax.core import features
  return {
      "format": fmt,
      "input": {"shape": ["batch", *input_hw, 3], "dtype": "uint8", "channels": "RGB"},
      "outputs": outputs,
      "model_signature": features.with_flip(loaded.signature, flip),
      "model_source": loaded.source,
      "jax_version": jax.__version__,
  }


def export(loaded, *, input_hw: tuple[int, int] | None = None, flip: bool = False,
           platforms: Sequence[str] = ("cpu", "cuda")) -> tuple[bytes, dict]:
  """A loaded model (serving.inference.load_model) -> (serialized function, metadata)."""
  input_hw = _input_hw(loaded, input_hw)
  fn = serving_fn(loaded.model, loaded.variables, loaded.config, input_hw=input_hw,
                  flip=flip)
  (batch,) = jax.export.symbolic_shape("batch")
  spec = jax.ShapeDtypeStruct((batch, *input_hw, 3), jnp.uint8)
  exported = jax.export.export(jax.jit(fn), platforms=tuple(platforms))(spec)
  metadata = _metadata(loaded, FORMAT, input_hw, flip, {
      k: [str(d) for d in v.shape] for k, v in zip(("areas", "feats"), exported.out_avals)})
  metadata["platforms"] = list(exported.platforms)
  return bytes(exported.serialize()), metadata


def export_onnx(loaded, *, input_hw: tuple[int, int] | None = None,
                flip: bool = False) -> tuple[bytes, dict]:
  """A LoadedModel -> (ONNX model bytes, metadata): images -> feats, areas."""
  from musp_jax.serving import onnx_lowering
  if loaded.config.model.get("dtype", "float32") != "float32":
    raise ValueError(f"ONNX export takes float32 models; this one computes in "
                     f"model.dtype={loaded.config.model.dtype!r}.")
  input_hw = _input_hw(loaded, input_hw)
  # Convolutions as convolutions (not the CPU training path's matrix products,
  # models/fast_conv.py): the same parameters and function, and the Conv nodes
  # ONNX runtimes optimise best.
  head = loaded.model.head
  if hasattr(head, "conv_impl"):  # the MUSP head's depthwise value conv
    head = head.clone(conv_impl="xla")
  model = loaded.model.clone(backbone=loaded.model.backbone.clone(conv_impl="xla"), head=head)
  fn = serving_fn(model, loaded.variables, loaded.config, input_hw=input_hw, flip=flip)
  (batch,) = jax.export.symbolic_shape("batch")
  spec = jax.ShapeDtypeStruct((batch, *input_hw, 3), jnp.uint8)

  def feats_and_areas(images):
    out = fn(images)
    return out["feats"], out["areas"]

  model = onnx_lowering.convert(feats_and_areas, spec, input_name="images",
                          output_names=("feats", "areas"),
                          doc="RGB uint8 images -> per-branch L2-normalised features, areas")
  outputs = {o.name: [d.dim_param or str(d.dim_value) for d in o.type.tensor_type.shape.dim]
             for o in model.graph.output}
  metadata = _metadata(loaded, ONNX_FORMAT, input_hw, flip, outputs)
  metadata["opset"] = onnx_lowering.OPSET
  entry = model.metadata_props.add()
  entry.key, entry.value = "musp_jax", json.dumps(metadata)
  return model.SerializeToString(), metadata


def onnx_parity(serialized: bytes, reference: Callable[[np.ndarray], dict],
                input_hw: tuple[int, int], *, batch_sizes: Sequence[int] = (4,),
                seed: int = 0) -> dict[str, float]:
  """Largest relative difference, onnxruntime (CPU) vs `reference`, on random images.

  Per image and branch: ||onnx - jax|| / ||jax|| for feats, and the same over
  each image's areas.
  """
  import onnxruntime
  session = onnxruntime.InferenceSession(serialized, providers=["CPUExecutionProvider"])
  rng = np.random.default_rng(seed)
  worst = {"feats": 0.0, "areas": 0.0}
  for n in batch_sizes:
    images = rng.integers(0, 256, (n, *input_hw, 3), dtype=np.uint8)
    got = dict(zip(("feats", "areas"), session.run(["feats", "areas"], {"images": images})))
    want = {k: np.asarray(v) for k, v in reference(images).items()}
    for k in worst:
      if got[k].shape != want[k].shape:
        raise ValueError(f"ONNX {k} has shape {got[k].shape}, JAX {want[k].shape}")
      err = np.linalg.norm(got[k] - want[k], axis=-1)
      scale = np.maximum(np.linalg.norm(want[k], axis=-1), 1e-12)
      worst[k] = max(worst[k], float(np.max(err / scale)))
  return worst


def write_npz(path: str, serialized: bytes, metadata: dict) -> None:
  """Writes the export atomically: a failed or killed write leaves `path` as it was."""
  with writing.atomic_file(path) as tmp:
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
  """Reads a file written by `write_npz` (needs jax and numpy, not the model code)."""
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
  from musp_jax.runtime import cli
  from musp_jax.runtime import process
  from musp_jax.serving import inference
  parser = argparse.ArgumentParser(
      prog="python -m musp_jax.export", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  inference.add_model_args(parser)
  parser.add_argument("--out", required=True, help="Output file (.npz, or .onnx).")
  parser.add_argument("--format", choices=FORMATS, default="jax",
                      help="jax: a jax.export artefact (.npz); onnx: an ONNX model (.onnx).")
  parser.add_argument("--input_size", type=int, nargs=2, default=None, metavar=("H", "W"),
                      help="Image size the function takes (default: the model's).")
  parser.add_argument("--flip", action="store_true", help="Flip-averaged features.")
  parser.add_argument("--platforms", nargs="+", default=None,
                      help="jax format: platforms to lower for (default: cpu cuda).")
  parser.add_argument("--no_verify", action="store_true",
                      help="onnx format: skip the onnxruntime parity check.")
  cli.add_verbose_arg(parser)
  args = parser.parse_args(argv)
  suffix = ".onnx" if args.format == "onnx" else ".npz"
  if not args.out.endswith(suffix):
    parser.error(f"--out {args.out}: expected a {suffix} path for --format {args.format}.")
  if args.platforms and args.format == "onnx":
    parser.error("--platforms is for --format jax; an ONNX model runs where its runtime does.")
  process.setup()
  return cli.run(lambda: _export_and_write(args), verbose=args.verbose)


def _export_and_write(args) -> None:
  """The command's work: load, export, check (ONNX), write, say what was written."""
  from musp_jax.serving import inference
  if args.format == "onnx" and not args.no_verify:
    try:
      import onnxruntime  # noqa: F401
    except ImportError:
      raise ImportError("--format onnx checks the model with onnxruntime, which is not "
                        "installed: pip install 'musp-jax[export]' (or pass "
                        "--no_verify).") from None
  loaded = inference.model_from_args(args)
  if args.format == "onnx":
    try:
      serialized, metadata = export_onnx(loaded, input_hw=args.input_size, flip=args.flip)
    except NotImplementedError as e:  # a primitive the lowering does not cover, named
      raise ValueError(f"ONNX export: {e}") from e
    if not args.no_verify:
      hw = _input_hw(loaded, args.input_size)
      parity = onnx_parity(serialized, jax.jit(serving_fn(
          loaded.model, loaded.variables, loaded.config, input_hw=hw, flip=args.flip)), hw)
      print(f"onnxruntime vs JAX on random images: relative difference "
            f"{parity['feats']:.1e} (feats), {parity['areas']:.1e} (areas)")
      if max(parity.values()) > PARITY_TOLERANCE:
        raise ValueError(f"the ONNX model differs from the JAX function by more than "
                         f"{PARITY_TOLERANCE} ({parity}); not written.")
    # A failed or killed write leaves an earlier file whole.
    with writing.atomic_file(args.out) as tmp:
      with open(tmp, "wb") as f:
        f.write(serialized)
  else:
    serialized, metadata = export(loaded, input_hw=args.input_size, flip=args.flip,
                                  platforms=args.platforms or ("cpu", "cuda"))
    write_npz(args.out, serialized, metadata)
  print(f"Wrote {args.out} ({len(serialized) / 2**20:.1f} MiB): "
        f"{json.dumps(metadata['input'])} -> {json.dumps(metadata['outputs'])}")

if __name__ == "__main__":
  sys.exit(main())
