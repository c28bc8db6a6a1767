"""A trained model for the user tools: loading, image files, features, signature.

embed, search, visualize and export all start the same way: read a workdir's
config.json, rebuild the model, restore a checkpoint, then turn image files into
L2-normalised per-branch features and areas (SPEC section 4). That shared part
lives here.

    loaded = inference.load(workdir="workdirs/demo")          # latest step
    loaded = inference.load(checkpoint="workdirs/demo/checkpoints/120")
    feats = inference.embed_files(loaded, inference.list_images(["photos/"]))

The class count is not in the config (it comes from the training data); it is
read from the checkpoint's classifier shape, so a workdir can be used on a
machine where the training dataset is not present.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from etils import epath

from musp_jax import augment
from musp_jax import checkpointing
from musp_jax import evaluator
from musp_jax import retrieval

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class SignatureMismatchError(ValueError):
  """Features come from another model than the one they are compared with."""


def hide_gpus_from_tensorflow() -> None:
  """TensorFlow (imported by tfds and clu) must not take GPU memory from JAX."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  tf.config.set_visible_devices([], "GPU")


# --------------------------------------------------------------------------
# Loading a model from a workdir or a checkpoint folder.


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """A restored model and what the tools need to run and describe it."""
  config: ml_collections.ConfigDict
  model: Any  # musp_jax.models.musp.ReIDModel
  variables: dict
  step: int
  source: str  # "<workdir>/checkpoints/<step>"
  signature: str  # see `model_signature`

  @property
  def image_size(self) -> tuple[int, int]:
    return tuple(int(v) for v in self.config.input.image_size)

  @property
  def has_attention(self) -> bool:
    return self.config.model.head == "musp"


def read_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """The resolved config a training run wrote to <workdir>/config.json."""
  path = epath.Path(workdir).expanduser() / "config.json"
  if not path.exists():
    raise FileNotFoundError(
        f"{path} not found: a workdir written by `python -m musp_jax.main` holds "
        "config.json and checkpoints/.")
  try:
    return ml_collections.ConfigDict(json.loads(path.read_text()))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from e


def resolve(workdir: str | os.PathLike | None = None, *,
            checkpoint: str | os.PathLike | None = None,
            step: int | None = None) -> tuple[epath.Path, int | None]:
  """(workdir, step) from either a workdir (+ step) or a checkpoint folder.

  A checkpoint folder is <workdir>/checkpoints/<step>, as Orbax writes it.
  """
  if (workdir is None) == (checkpoint is None):
    raise ValueError("Give exactly one of --workdir or --checkpoint.")
  if workdir is not None:
    return epath.Path(workdir).expanduser(), step
  ckpt = epath.Path(checkpoint).expanduser()
  if not ckpt.is_dir():
    raise FileNotFoundError(f"Checkpoint folder {ckpt} does not exist.")
  if not ckpt.name.isdigit() or ckpt.parent.name != "checkpoints":
    raise ValueError(
        f"--checkpoint {ckpt}: expected a step folder <workdir>/checkpoints/<step>.")
  if step is not None and step != int(ckpt.name):
    raise ValueError(f"--checkpoint names step {ckpt.name} but --step is {step}.")
  return ckpt.parent.parent, int(ckpt.name)


def load(workdir: str | os.PathLike | None = None, *,
         checkpoint: str | os.PathLike | None = None,
         step: int | None = None) -> LoadedModel:
  """Restores a model for inference (default: the workdir's latest step)."""
  # Imported here so that loading an exported model never imports the model code.
  from musp_jax import optim  # pylint: disable=g-import-not-at-top
  from musp_jax import train  # pylint: disable=g-import-not-at-top
  from musp_jax.models import build_model  # pylint: disable=g-import-not-at-top

  workdir, step = resolve(workdir, checkpoint=checkpoint, step=step)
  config = read_config(workdir)
  manager = checkpointing.make_manager(workdir / "checkpoints", read_only=True)
  step = checkpointing.resolve_step(manager, step)
  size = tuple(int(v) for v in config.input.image_size)
  num_classes = _checkpoint_num_classes(
      manager, step, lambda k: build_model(config.model, k), size)
  model = build_model(config.model, num_classes)
  abstract = train.abstract_train_state(
      model, optim.make_optimizer(config.optim, 1), size,
      jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
  state, _, _ = checkpointing.restore(manager, abstract, model_config=config.model, step=step)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  out = jax.eval_shape(functools.partial(model.apply, train=False), variables,
                       jax.ShapeDtypeStruct((1, *size, 3), jnp.float32))
  num_parts, channels = out["feats"].shape[1:]
  signature = model_signature(config, num_parts=num_parts, channels=channels,
                              weights=weights_fingerprint(variables))
  return LoadedModel(config=config, model=model, variables=variables, step=int(step),
                     source=str(workdir / "checkpoints" / str(step)), signature=signature)


def _leaf_shapes(tree) -> dict[str, tuple[int, ...]]:
  return {checkpointing.path_str(k): tuple(np.shape(v))
          for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _checkpoint_num_classes(manager, step: int, make_model: Callable[[int], Any],
                            size: tuple[int, int]) -> int:
  """The class count the checkpoint was trained with, from its classifier shapes.

  Builds the model abstractly with two probe class counts; the parameter
  dimensions that follow the probe are the classifier's, and the checkpoint's
  value at that position is the class count.
  """
  probes = (3, 7)
  shapes = []
  for k in probes:
    variables = jax.eval_shape(
        functools.partial(make_model(k).init, train=False), jax.random.key(0),
        jax.ShapeDtypeStruct((1, *size, 3), jnp.float32))
    shapes.append(_leaf_shapes(variables["params"]))
  saved_params = manager.item_metadata(step)["state"]["params"]
  saved = {k: tuple(getattr(v, "shape", ()) or ())
           for k, v in jax.tree_util.tree_leaves_with_path(saved_params)
           for k in [checkpointing.path_str(k)]}
  for path, shape_a in shapes[0].items():
    shape_b = shapes[1][path]
    for axis, (a, b) in enumerate(zip(shape_a, shape_b)):
      if (a, b) == probes and path in saved and len(saved[path]) == len(shape_a):
        return int(saved[path][axis])
  raise checkpointing.CheckpointMismatchError(
      f"{manager.directory}/{step}: found no classifier parameter matching the model "
      "of config.json; was the checkpoint written for another architecture?")


def weights_fingerprint(variables: Any) -> str:
  """A short hash of every array (by path), telling two sets of weights apart."""
  digest = hashlib.sha1()
  for path, value in sorted(
      (jax.tree_util.keystr(k), v) for k, v in jax.tree_util.tree_leaves_with_path(variables)):
    digest.update(path.encode())
    digest.update(np.ascontiguousarray(jax.device_get(value)).tobytes())
  return digest.hexdigest()[:16]


# --------------------------------------------------------------------------
# The model signature stored with saved features.

SIGNATURE_FIELDS = ("head", "depth", "last_stride", "num_prototypes", "value_conv",
                    "value_channels", "pooling", "ese", "attention", "global_feature",
                    "global_branch")


def model_signature(config: ml_collections.ConfigDict, *, num_parts: int, channels: int,
                    weights: str, flip: bool = False) -> str:
  """A JSON string naming what makes two feature sets comparable.

  Architecture fields, P and C, the input size and normalisation, flip
  averaging and a fingerprint of the weights: features of two models (or of one
  model fed differently) must never be ranked against each other.
  """
  sig = {k: config.model[k] for k in SIGNATURE_FIELDS}
  sig.update(parts=int(num_parts), channels=int(channels),
             image_size=[int(v) for v in config.input.image_size],
             normalize=config.input.normalize, flip=bool(flip), weights=weights)
  return json.dumps(sig, sort_keys=True)


def with_flip(signature: str, flip: bool) -> str:
  sig = json.loads(signature)
  sig["flip"] = bool(flip)
  return json.dumps(sig, sort_keys=True)


def check_signature(found: str, expected: str, *, found_where: str,
                    expected_where: str) -> None:
  """Raises SignatureMismatchError naming each differing field."""
  if found == expected:
    return
  try:
    a, b = json.loads(found or "{}"), json.loads(expected or "{}")
  except json.JSONDecodeError:
    a, b = {"signature": found}, {"signature": expected}
  diffs = [f"{k}: {found_where} has {a.get(k)!r}, {expected_where} has {b.get(k)!r}"
           for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
  raise SignatureMismatchError(
      f"{found_where} was made by another model than {expected_where}; features of "
      "different models cannot be compared:\n  " + "\n  ".join(diffs or ["(unreadable)"]))


# --------------------------------------------------------------------------
# Image files.


def list_images(paths: Sequence[str | os.PathLike]) -> list[tuple[str, str]]:
  """Image files under `paths` -> sorted [(name, path)].

  A folder contributes its image files (by suffix, searched recursively, named
  relative to the folder); a file is taken as given, whatever its suffix, and
  is checked when decoded.
  """
  if not paths:
    raise ValueError("No image paths given.")
  found = []
  for p in paths:
    p = pathlib.Path(p).expanduser()
    if p.is_dir():
      files = sorted(f for f in p.rglob("*")
                     if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
      if not files:
        raise FileNotFoundError(
            f"No images in folder {p} (looked for {', '.join(IMAGE_SUFFIXES)}).")
      found += [(str(f.relative_to(p)), str(f)) for f in files]
    elif p.is_file():
      found.append((p.name, str(p)))
    else:
      raise FileNotFoundError(f"{p} is neither an image file nor a folder.")
  return found


def decode_image(data: bytes, *, where: str) -> np.ndarray:
  """RGB uint8 (H, W, 3), or a ValueError naming `where`."""
  try:
    return augment.decode(data)
  except Exception as e:  # cv2 raises several types on garbage input
    raise ValueError(
        f"{where} is not a readable image ({len(data)} bytes; expected JPEG, PNG, BMP, "
        f"WebP or TIFF): {e}") from e


# --------------------------------------------------------------------------
# Features.


@functools.cache
def _jitted_features(model, flip: bool):
  return jax.jit(functools.partial(evaluator.embed, model=model, flip=flip))


def embed_bytes(loaded: LoadedModel, images: Iterable[tuple[str, bytes]], *,
                total: int | None = None, batch_size: int = 32, flip: bool = False,
                desc: str = "embedding", progress: bool = True
                ) -> tuple[np.ndarray, np.ndarray]:
  """Encoded images [(name, bytes)] -> feats (N, P, C), areas (N, P).

  Batches have a fixed size (the last one padded) so the model compiles once.
  """
  transform = augment.TestTransform.from_config(loaded.config.input)
  fn = _jitted_features(loaded.model, flip)
  feats, areas, batch = [], [], []

  def run(batch):
    x = np.zeros((batch_size, *loaded.image_size, 3), np.float32)
    for i, (name, data) in enumerate(batch):
      try:
        x[i] = transform(data)
      except Exception:
        decode_image(data, where=name)  # names the file if it is not an image
        raise
    f, a = jax.device_get(fn(loaded.variables, x))
    feats.append(f[:len(batch)])
    areas.append(a[:len(batch)])

  with tqdm.tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
    for item in images:
      batch.append(item)
      if len(batch) == batch_size:
        run(batch)
        bar.update(len(batch))
        batch = []
    if batch:
      run(batch)
      bar.update(len(batch))
  if not feats:
    raise ValueError("No images to embed.")
  return np.concatenate(feats), np.concatenate(areas)


def embed_files(loaded: LoadedModel, files: Sequence[tuple[str, str]], *,
                batch_size: int = 32, flip: bool = False,
                progress: bool = True) -> retrieval.Features:
  """Image files [(name, path)] (see `list_images`) -> saved-features form."""
  items = ((path, epath.Path(path).read_bytes()) for _, path in files)
  feats, areas = embed_bytes(loaded, items, total=len(files), batch_size=batch_size,
                             flip=flip, progress=progress)
  n = len(files)
  return retrieval.Features(
      feats=feats, areas=areas, ids=np.full(n, -1, np.int64), cams=np.full(n, -1, np.int64),
      file_names=np.asarray([name for name, _ in files], dtype=str),
      model_signature=with_flip(loaded.signature, flip))


def preprocess(config: ml_collections.ConfigDict, image_HxWx3: np.ndarray) -> np.ndarray:
  """A decoded RGB uint8 image -> the model's input, as the test transform makes it."""
  transform = augment.TestTransform.from_config(config.input)
  return transform.normalize(augment.resize(image_HxWx3, transform.size_hw))


@functools.cache
def attention_fn(model) -> Callable:
  """jit((variables, images (B, H, W, 3)) -> attention (B, h, w, n) float32)."""
  return jax.jit(lambda variables, images: model.apply(
      variables, images, train=False)["attention"].astype(jnp.float32))
