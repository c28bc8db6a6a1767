"""grain pipelines: PK training batches and padded evaluation batches.

Training: a MapDataset over steps -> this process's slots of the PK batch
(sampling.PKSampler) -> per slot: read record, decode, translate, flip (uint8,
written straight into the batch array) and draw the erase box -> batch (uint8
images, erase boxes, labels) -> `ds[start_step:]` -> to_iter_dataset ->
mp_prefetch. Every image is a pure function of (seed, global step, position in
the global batch), so the batches do not depend on the number of workers or
processes, and resuming at step s rebuilds the dataset at s instead of
restoring iterator state.

Multi-host: process i loads rows [i*b, (i+1)*b) of every global batch
(b = global_batch_size / process_count); `device_put_batch` assembles the
global array from the process-local rows.

With input.num_workers > 0 the batches are made in grain worker processes, in
shared memory (musp_jax/data/workers.py).
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

import grain
import jax
import numpy as np

from musp_jax.data import augment
from musp_jax.data import sampling
from musp_jax.data import workers

steps_per_epoch = sampling.steps_per_epoch

# Length of the (conceptually endless) training dataset, in steps.
_MAX_STEPS = 2**40


def _local_batch_size(global_batch_size: int, process_index: int,
                      process_count: int) -> int:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in "
                     f"[0, process_count={process_count}).")
  if global_batch_size % process_count:
    raise ValueError(f"Global batch {global_batch_size} is not divisible by "
                     f"process_count={process_count}.")
  return global_batch_size // process_count


def _batch_images(n: int, size_hw: tuple[int, int], shared: bool) -> np.ndarray:
  shape = (n, *size_hw, 3)
  return workers.shared_array(shape, np.uint8) if shared else np.empty(shape, np.uint8)


class _TrainBatch:
  """Step -> this process's rows of the global PK batch at that step.

  Each image is written into the batch array as it is made (uint8; normalisation
  and erasing run in the jitted step, musp_jax/core/preprocess.py), so a worker never
  holds a batch's images twice. In a worker the array is in shared memory, and
  grain hands the main process a handle instead of copying it.
  """

  def __init__(self, source, labels, sampler, transform, *, seed, local_batch_size,
               process_index, shared_memory):
    self.source = source
    self.labels = labels
    self.sampler = sampler
    self.transform = transform
    self.seed = seed
    self.local_batch_size = local_batch_size
    self.offset = process_index * local_batch_size
    self.shared_memory = shared_memory

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    step = int(step)
    slots = range(self.offset, self.offset + self.local_batch_size)
    records = self.sampler[step][self.offset:self.offset + self.local_batch_size]
    images = _batch_images(len(slots), self.transform.size_hw, self.shared_memory)
    boxes = np.empty((len(slots), 4), np.int32)
    for i, (slot, record) in enumerate(zip(slots, records)):
      rng = augment.train_rng(self.seed, step, slot)
      images[i], boxes[i] = self.transform(self.source[int(record)]["image"], rng)
    return {"image": images, "erase": boxes,
            "label": np.asarray(self.labels[records], np.int32)}


class _EvalBatch:
  """Step -> this process's rows of the padded evaluation batch at that step."""

  def __init__(self, source, transform, *, num_records, global_batch_size,
               local_batch_size, process_index, shared_memory):
    self.source = source
    self.transform = transform
    self.num_records = num_records
    self.global_batch_size = global_batch_size
    self.local_batch_size = local_batch_size
    self.offset = process_index * local_batch_size
    self.shared_memory = shared_memory

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    first = int(step) * self.global_batch_size + self.offset
    index = np.arange(first, first + self.local_batch_size)
    index = np.where(index < self.num_records, index, -1).astype(np.int32)
    images = _batch_images(len(index), self.transform.size_hw, self.shared_memory)
    for i, record in enumerate(index):
      if record < 0:
        images[i] = 0  # padding
      else:
        images[i] = self.transform(self.source[int(record)]["image"])
    return {"image": images, "mask": index >= 0, "index": index}


def train_dataset(
    source: Sequence[dict[str, Any]],
    labels: np.ndarray,
    input_config: Any,
    *,
    seed: int,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    shared_memory: bool = False,
    domains: np.ndarray | None = None,
) -> grain.MapDataset:
  """The training MapDataset of this process's batches, indexed by step.

  shared_memory: build batches in shared memory (for grain worker processes).
  domains: the dataset of each record; with input.balance_datasets, each batch takes
  a fixed share of its identities from every dataset (sampling.PKSampler).
  """
  labels = np.asarray(labels)
  if len(labels) != len(source):
    raise ValueError(f"labels has {len(labels)} entries but the train source "
                     f"has {len(source)} records.")
  p, k = int(input_config.num_ids), int(input_config.num_instances)
  if global_batch_size != p * k:
    raise ValueError(
        f"global_batch_size={global_batch_size} but input.num_ids * "
        f"input.num_instances = {p} * {k} = {p * k}; PK batches need them equal."
    )
  local = _local_batch_size(global_batch_size, process_index, process_count)
  # One dataset is balanced as it is: its batches stay those of the plain sampler.
  balanced = (domains is not None and input_config.balance_datasets
              and len(np.unique(domains)) > 1)
  sampler = sampling.PKSampler(labels, num_ids=p, num_instances=k, seed=seed,
                               domains=domains if balanced else None)
  transform = augment.TrainTransform.from_config(input_config)
  return grain.MapDataset.range(_MAX_STEPS).map(_TrainBatch(
      source, labels, sampler, transform, seed=seed, local_batch_size=local,
      process_index=process_index, shared_memory=shared_memory))


def train_batches(
    source: Sequence[dict[str, Any]],
    labels: np.ndarray,
    input_config: Any,
    *,
    seed: int,
    start_step: int,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    domains: np.ndarray | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """Endless PK training batches from global step `start_step`.

  Yields {"image": uint8 (b, H, W, 3), "erase": int32 (b, 4) erase boxes,
  "label": int32 (b,)}, b = global_batch_size / process_count: rows
  [process_index * b, ...) of each global batch. The train step normalises and
  erases on the device (preprocess.train_images). `labels` (from
  datasets.split_index) gives each record's label without reading images; `domains`
  its dataset (train_dataset).
  """
  if start_step < 0:
    raise ValueError(f"start_step={start_step} must be >= 0.")
  ds = train_dataset(source, labels, input_config, seed=seed,
                     global_batch_size=global_batch_size,
                     process_index=process_index, process_count=process_count,
                     shared_memory=input_config.num_workers > 0, domains=domains)
  return workers.iterate(ds[start_step:], input_config)


def num_eval_batches(num_records: int, batch_size: int) -> int:
  """Global evaluation batches over `num_records` (last one padded)."""
  return math.ceil(num_records / batch_size)


def eval_batches(
    source: Sequence[dict[str, Any]],
    input_config: Any,
    *,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
  """Every record of `source` once, in order, in global batches of batch_size.

  Yields {"image": uint8 (b, H, W, 3), "mask": bool (b,), "index": int32
  (b,)} with b = batch_size / process_count; the last global batch is padded
  with zero images, mask False and index -1. The feature function normalises
  on the device (features.embed). `index` is the record's position
  in `source` (global), so gathered rows can be matched to split_index.
  """
  local = _local_batch_size(batch_size, process_index, process_count)
  n = len(source)
  steps = num_eval_batches(n, batch_size)
  transform = augment.TestTransform.from_config(input_config)
  ds = grain.MapDataset.range(steps).map(_EvalBatch(
      source, transform, num_records=n, global_batch_size=batch_size,
      local_batch_size=local, process_index=process_index,
      shared_memory=input_config.num_workers > 0))
  return workers.iterate(ds, input_config)


def device_put_batch(
    batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding
) -> dict[str, jax.Array]:
  """Host batch (this process's rows) -> global arrays with `sharding`.

  `sharding` is the batch sharding of the mesh, e.g.
  NamedSharding(mesh, PartitionSpec("data")); each process passes its own
  rows and jax assembles the global batch across processes.
  """
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
