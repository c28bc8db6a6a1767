"""A trained model for the user tools: loading, image files, features.

embed, search, visualize, export and the demo all start the same way: restore a
checkpoint's weights with `checkpointing.load_variables` (its run config and class
count come with it), rebuild the model, then turn image files into L2-normalised
per-branch features and areas with `features.embed` (docs/design.md section 4).

    loaded = inference.load_model("workdirs/demo")                       # latest step
    loaded = inference.load_model("workdirs/demo/checkpoints/120")       # a step folder
    feats = inference.embed_files(loaded, inference.list_images(["photos/"]))
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import pathlib
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from etils import epath

from musp_jax.data import augment
from musp_jax.training import checkpointing
from musp_jax.core import features
from musp_jax import models
from musp_jax.retrieval import saved_features

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


# --------------------------------------------------------------------------
# Loading a model from a workdir or a checkpoint folder.


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """A restored model and what the tools need to run and describe it."""
  config: ml_collections.ConfigDict  # the run config saved with the checkpoint
  model: Any  # musp_jax.models.musp.ReIDModel
  variables: dict
  step: int
  source: str  # "<workdir>/checkpoints/<step>"
  signature: str  # see `features.model_signature`

  @property
  def image_size(self) -> tuple[int, int]:
    return tuple(int(v) for v in self.config.input.image_size)

  @property
  def has_attention(self) -> bool:
    return self.config.model.head == "musp"

  def with_overrides(self, *, data_dir: str | None = None,
                     eval_batch_size: int | None = None) -> LoadedModel:
    """The model with its saved config pointing at another data_dir / eval batch size."""
    if data_dir is None and eval_batch_size is None:
      return self
    config = ml_collections.ConfigDict(self.config.to_dict())
    if data_dir is not None:
      config.dataset.data_dir = data_dir
    if eval_batch_size is not None:
      config.eval.batch_size = eval_batch_size
    return dataclasses.replace(self, config=config)


def load_model(path: str | os.PathLike, *, step: int | None = None) -> LoadedModel:
  """Restores a model for inference from a workdir (default: its latest step) or a
  step folder <workdir>/checkpoints/<step>."""
  restored = checkpointing.load_variables(path, step=step)
  config = restored.run.config
  if checkpointing.IMPORTED in config:
    raise ValueError(
        f"{restored.source} holds weights converted by import_weights, without a "
        "training config (image size, preprocessing): train from them with "
        "--config.model.init_from, or evaluate them with `python -m musp_jax.main "
        "--mode=eval --workdir ... --config ...`.")
  model = models.build_model(config.model, restored.run.num_classes)
  size = tuple(int(v) for v in config.input.image_size)
  out = jax.eval_shape(functools.partial(model.apply, train=False), restored.variables,
                       jax.ShapeDtypeStruct((1, *size, 3), jnp.float32))
  num_parts, channels = out["feats"].shape[1:]
  signature = features.model_signature(
      config, num_parts=num_parts, channels=channels,
      weights=features.weights_fingerprint(restored.variables))
  return LoadedModel(config=config, model=model, variables=restored.variables,
                     step=restored.step, source=restored.source, signature=signature)


def add_model_args(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
  """--workdir / --checkpoint / --step, shared by the tools."""
  group = parser.add_mutually_exclusive_group(required=required)
  group.add_argument("--workdir", help="Training workdir (with checkpoints/).")
  group.add_argument("--checkpoint", help="A step folder <workdir>/checkpoints/<step>.")
  parser.add_argument("--step", type=int, default=None,
                      help="With --workdir: the checkpoint step (default: latest).")


def model_from_args(args: argparse.Namespace) -> LoadedModel:
  """The model named by `add_model_args`' arguments."""
  return load_model(args.workdir or args.checkpoint, step=args.step)


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


# --------------------------------------------------------------------------
# Features.


def embed_bytes(loaded: LoadedModel, images: Iterable[tuple[str, bytes]], *,
                total: int | None = None, batch_size: int = 32, flip: bool = False,
                desc: str = "embedding", progress: bool = True
                ) -> tuple[np.ndarray, np.ndarray]:
  """Encoded images [(name, bytes)] -> feats (N, P, C), areas (N, P).

  Batches have a fixed size (the last one padded) so the model compiles once.
  """
  transform = augment.TestTransform.from_config(loaded.config.input)
  fn = features.jitted_embed(loaded.model, flip, loaded.config.input.normalize)
  feats, areas, batch = [], [], []

  def run(batch):
    x = np.zeros((batch_size, *loaded.image_size, 3), np.uint8)
    for i, (name, data) in enumerate(batch):
      try:
        x[i] = transform(data)
      except Exception:
        augment.decode(data, where=name)  # names the file if it is not an image
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
                progress: bool = True) -> saved_features.Features:
  """Image files [(name, path)] (see `list_images`) -> saved-features form."""
  items = ((path, epath.Path(path).read_bytes()) for _, path in files)
  feats, areas = embed_bytes(loaded, items, total=len(files), batch_size=batch_size,
                             flip=flip, progress=progress)
  n = len(files)
  return saved_features.Features(
      feats=feats, areas=areas, ids=np.full(n, -1, np.int64), cams=np.full(n, -1, np.int64),
      file_names=np.asarray([name for name, _ in files], dtype=str),
      model_signature=features.with_flip(loaded.signature, flip))
