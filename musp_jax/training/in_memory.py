"""Training and evaluation on in-memory splits with the numerical core alone.

A bare GPU image has jax, flax, optax, orbax and numpy but not the I/O stack
(TensorFlow, tfds, grain, clu). This driver runs there on records the caller holds
in memory (scripts/ablation.py renders the synthetic vehicles in the process: the
records the TFDS builder writes), and everything else is what
`train.train_and_evaluate` uses:

  batches     the PK sampler (data/sampling.py, a pure function of (seed, step)) and
              the train transform (augment.TrainTransform, each image seeded by
              augment.train_rng): the same uint8 batches as the grain pipeline, made by
              a few threads (OpenCV releases the GIL);
  step        step.jit_step, the one compiled train step, with the state of
              state.create_train_state (model.init_from included);
  evaluation  features.embed and features.attention on fixed-shape padded batches, the
              query/gallery protocol (protocols.query_gallery) and the attention scores
              against the part masks (attention_scores).

Used by scripts/ablation.py --runner core (the soft-partition study, its probes and its
GPU command).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from musp_jax.core import features
from musp_jax.core import optim
from musp_jax.core import state as state_lib
from musp_jax.core import step as step_lib
from musp_jax.data import augment
from musp_jax.data import sampling
from musp_jax.models import build_model
from musp_jax.retrieval import protocols
from musp_jax.retrieval import saved_features
from musp_jax.training import attention_scores
from musp_jax.training import checkpointing

_PREFETCH = 4  # batches made ahead by the threads


@dataclasses.dataclass(frozen=True)
class MemorySplit:
  """One split's records in memory, in the dataset's order."""
  images: Sequence[bytes]  # JPEG
  vehicle_ids: np.ndarray
  camera_ids: np.ndarray
  part_masks: Sequence[bytes]  # PNG label maps
  file_names: Sequence[str]

  @classmethod
  def from_records(cls, records: Sequence[Any]) -> "MemorySplit":
    """From records with the fields image, vehicle_id, camera_id, part_mask and
    file_name (attributes, as the synthetic renderer's scenes.Scene)."""
    return cls(images=[r.image for r in records],
               vehicle_ids=np.array([r.vehicle_id for r in records], np.int64),
               camera_ids=np.array([r.camera_id for r in records], np.int64),
               part_masks=[r.part_mask for r in records],
               file_names=[r.file_name for r in records])

  def __len__(self) -> int:
    return len(self.images)

  def labels(self) -> tuple[np.ndarray, tuple[int, ...]]:
    """Training labels 0..K-1 in sorted vehicle-id order (as the builders number them),
    and the vehicle id of each label."""
    ids, labels = np.unique(self.vehicle_ids, return_inverse=True)
    return labels.astype(np.int32), tuple(int(v) for v in ids)


# --------------------------------------------------------------------------
# Training.


def train_batch(split: MemorySplit, labels: np.ndarray, sampler: sampling.PKSampler,
                transform: augment.TrainTransform, *, seed: int, step: int
                ) -> dict[str, np.ndarray]:
  """The global PK batch of `step`: uint8 images, erase boxes and labels, as
  input_pipeline.train_batches makes it from the same records."""
  records = sampler[step]
  h, w = transform.size_hw
  images = np.empty((len(records), h, w, 3), np.uint8)
  boxes = np.empty((len(records), 4), np.int32)
  for slot, record in enumerate(records):
    images[slot], boxes[slot] = transform(split.images[int(record)],
                                          augment.train_rng(seed, step, slot))
  return {"image": images, "erase": boxes, "label": np.asarray(labels[records], np.int32)}


def train_batches(split: MemorySplit, labels: np.ndarray, input_config: Any, *, seed: int,
                  start_step: int, stop_step: int, threads: int = 4
                  ) -> Iterator[dict[str, np.ndarray]]:
  """Batches start_step..stop_step-1, made ahead by `threads` threads."""
  sampler = sampling.PKSampler(labels, num_ids=input_config.num_ids,
                               num_instances=input_config.num_instances, seed=seed)
  transform = augment.TrainTransform.from_config(input_config)
  make = functools.partial(train_batch, split, labels, sampler, transform, seed=seed)
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    pending = [pool.submit(make, step=s)
               for s in range(start_step, min(stop_step, start_step + _PREFETCH))]
    for step in range(start_step, stop_step):
      batch = pending.pop(0).result()
      if step + _PREFETCH < stop_step:
        pending.append(pool.submit(make, step=step + _PREFETCH))
      yield batch


def schedule(config: ml_collections.ConfigDict, num_images: int) -> tuple[int, int]:
  """(steps per epoch, total steps) of the recipe on `num_images` training images."""
  per_epoch = sampling.steps_per_epoch(
      num_images, config.input.num_ids * config.input.num_instances)
  return per_epoch, config.optim.num_epochs * per_epoch


@dataclasses.dataclass
class Trained:
  model: Any
  state: Any
  num_classes: int
  label_identities: tuple[tuple[str, int], ...]  # (dataset, vehicle id) of each label
  seconds: float  # the training loop's wall time, compilation included
  history: list[dict[str, float]]  # logged means


def train(config: ml_collections.ConfigDict, split: MemorySplit, *, mesh,
          log: Callable[[str], None] = print, log_every: int = 50) -> Trained:
  """Trains config's model on `split` with config's recipe (model.init_from included)."""
  labels, label_ids = split.labels()
  per_epoch, total = schedule(config, len(split))
  model = build_model(config.model, len(label_ids))
  tx = optim.make_optimizer(config.optim, per_epoch)
  state, state_sharding = state_lib.create_train_state(
      model, tx, config.input.image_size, seed=config.seed, mesh=mesh,
      init_variables=checkpointing.init_function(config.model))
  step_fn = step_lib.jit_step(model=model, tx=tx, loss_config=config.loss,
                              input_config=config.input, mesh=mesh,
                              state_sharding=state_sharding)
  batch_sharding = NamedSharding(mesh, P("data"))
  start, history, window = time.time(), [], []
  for step, batch in enumerate(train_batches(split, labels, config.input, seed=config.seed,
                                             start_step=0, stop_step=total)):
    state, metrics = step_fn(state, jax.device_put(batch, batch_sharding))
    window.append(metrics)
    if (step + 1) % log_every == 0 or step + 1 == total:
      means = {k: float(np.mean([np.mean(jax.device_get(m[k])) for m in window]))
               for k in ("loss", "id_loss", "triplet_loss", "diversity_loss", "id_accuracy")
               if k in window[0]}
      if not math.isfinite(means["loss"]):
        raise FloatingPointError(f"Loss became {means['loss']} by step {step + 1}; lower "
                                 "optim.lr or enable optim.grad_clip.")
      history.append({"step": step + 1, **means})
      log(f"  step {step + 1}/{total}: " + ", ".join(f"{k} {v:.4g}" for k, v in means.items())
          + f" ({(step + 1) / (time.time() - start):.2f} steps/s)")
      window = []
  jax.block_until_ready(state)
  identities = tuple((str(config.dataset.name), int(v)) for v in label_ids)
  return Trained(model, state, len(label_ids), identities, time.time() - start, history)


def save(trained: Trained, config: ml_collections.ConfigDict, workdir: str) -> str:
  """Saves the trained state as a training workdir's step (for model.init_from)."""
  manager = checkpointing.make_manager(os.path.join(workdir, "checkpoints"), keep=1)
  step = int(jax.device_get(trained.state.step))
  checkpointing.save(manager, step, trained.state, next_step=step,
                     run=checkpointing.RunInfo(config, trained.num_classes,
                                               trained.label_identities))
  manager.wait_until_finished()
  return os.path.join(workdir, "checkpoints", str(step))


# --------------------------------------------------------------------------
# Evaluation.


def apply_to_split(fn, variables, split: MemorySplit, config: ml_collections.ConfigDict,
                   *, mesh) -> tuple[np.ndarray, ...]:
  """fn(variables, uint8 images) over a split in fixed-shape padded batches of
  eval.batch_size (test transform) -> each output (N, ...) float32 in order."""
  transform = augment.TestTransform.from_config(config.input)
  size = config.eval.batch_size
  h, w = transform.size_hw
  batch_sharding = NamedSharding(mesh, P("data"))
  outs = None
  for lo in range(0, len(split), size):
    hi = min(lo + size, len(split))
    images = np.zeros((size, h, w, 3), np.uint8)
    for i in range(lo, hi):
      images[i - lo] = transform(split.images[i])
    ys = fn(variables, jax.device_put(images, batch_sharding))
    ys = [np.asarray(jax.device_get(y), np.float32) for y in
          (ys if isinstance(ys, tuple) else (ys,))]
    if outs is None:
      outs = [np.zeros((len(split), *y.shape[1:]), np.float32) for y in ys]
    for out, y in zip(outs, ys):
      out[lo:hi] = y[:hi - lo]
  return tuple(outs)


@functools.cache
def _features_and_attention(model, flip: bool, normalize: str):
  def fn(variables, pixels):
    feats, areas = features.embed(variables, pixels, model=model, flip=flip,
                                  normalize=normalize)
    return feats, areas, features.attention(variables, pixels, model=model,
                                            normalize=normalize)
  return jax.jit(fn)


def evaluate(model, variables, config: ml_collections.ConfigDict,
             splits: dict[str, MemorySplit], *, mesh, classes: Sequence[str],
             name: str = "synthetic_vehicles"
             ) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
  """The query/gallery protocol row and, for MUSP, the attention row scored against
  the part masks, whose values `classes` names (as evaluator.evaluate_model's rows);
  and the attention maps of the query and gallery images."""
  musp = config.model.head == "musp"
  flip = bool(config.eval.flip)
  fn = (_features_and_attention(model, flip, config.input.normalize) if musp
        else features.jitted_embed(model, flip, config.input.normalize))
  out, maps = {}, {}
  for role in ("query", "gallery"):
    split = splits[role]
    ys = apply_to_split(fn, variables, split, config, mesh=mesh)
    out[role] = saved_features.Features(ys[0], ys[1], split.vehicle_ids, split.camera_ids)
    if musp:
      maps[role] = ys[2]
  rows = protocols.query_gallery(out, name=name, eval_config=config.eval)
  if musp:
    sources = [[{attention_scores.MASK_KEY: m} for m in splits[r].part_masks]
               for r in ("query", "gallery")]
    rows[attention_scores.ROW] = attention_scores.score_splits(
        np.concatenate([maps["query"], maps["gallery"]]), sources, classes)
  return rows, maps
