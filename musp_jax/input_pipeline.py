"""grain pipelines: PK training batches and padded evaluation batches.

Training: a MapDataset over this process's element positions -> PK record
index (sampling.PKSampler) -> read record -> decode, translate, flip (uint8)
-> batch (normalise and erase straight into the batch array) ->
`ds[start_step:]` -> to_iter_dataset -> mp_prefetch. Every element is a pure
function of (seed, global step, position in the global batch), so the batches
do not depend on the number of workers or processes, and resuming at step s
rebuilds the dataset at s instead of restoring iterator state.

Multi-host: process i loads rows [i*b, (i+1)*b) of every global batch
(b = global_batch_size / process_count); `device_put_batch` assembles the
global array from the process-local rows.

Workers are spawned processes; they import this module, numpy, OpenCV and
grain (which imports JAX without using it), hide accelerators first, ignore
Ctrl-C and SIGTERM (the training process stops them) and exit when the training
process is gone (`_start_worker`).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import math
import os
import signal
import threading
import time
from typing import Any, Iterator, Sequence

import cv2
import grain
import jax
import numpy as np

from musp_jax import augment
from musp_jax import sampling

steps_per_epoch = sampling.steps_per_epoch

# Separate random streams from the one run seed (the sampler uses 0).
_AUGMENT_STREAM = 1
# Length of the (conceptually endless) training dataset, in steps.
_MAX_STEPS = 2**40
# How often a worker checks that the training process is still alive, in seconds.
_PARENT_POLL_S = 0.5
# Signals that stop training; the training process handles them, workers ignore them.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _start_worker(worker_index: int, worker_count: int, *, parent_pid: int) -> None:
  """grain worker start-up: no accelerators, no terminal signals, die with the parent.

  Ctrl-C reaches every process of the terminal's group and a scheduler's SIGTERM may
  reach every process of the job: the training process handles both (it finishes its
  step and saves) and stops its workers itself, so workers ignore them. A trainer
  killed outright (SIGKILL, the OOM killer) cannot stop them: a watchdog thread ends
  the worker once its parent is gone, and the shared memory of its batches is freed
  by multiprocessing's resource tracker when the last worker exits.
  """
  del worker_index, worker_count
  os.environ["CUDA_VISIBLE_DEVICES"] = ""
  os.environ["JAX_PLATFORMS"] = "cpu"
  jax.config.update("jax_platforms", "cpu")
  # One process per core already; OpenCV's own threads would oversubscribe.
  cv2.setNumThreads(1)
  for signum in _STOP_SIGNALS:  # blocked since birth (see _WorkerBatches)
    signal.signal(signum, signal.SIG_IGN)
  if hasattr(signal, "pthread_sigmask"):
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
  threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True,
                   name="exit-with-parent").start()


def _exit_with_parent(parent_pid: int) -> None:
  # Polled rather than prctl(PR_SET_PDEATHSIG): grain starts workers from helper
  # threads, and that signal fires when the starting thread ends, not the process.
  while os.getppid() == parent_pid:
    time.sleep(_PARENT_POLL_S)
  os._exit(1)  # pylint: disable=protected-access


def _check_split(global_batch_size: int, process_index: int,
                 process_count: int) -> int:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in "
                     f"[0, process_count={process_count}).")
  if global_batch_size % process_count:
    raise ValueError(f"Global batch {global_batch_size} is not divisible by "
                     f"process_count={process_count}.")
  return global_batch_size // process_count


class _TrainElement:
  """Process-local position -> uint8 geometry, erase box and label."""

  def __init__(self, source, labels, sampler, transform, *, seed,
               local_batch_size, process_index):
    self.source = source
    self.labels = labels
    self.sampler = sampler
    self.transform = transform
    self.seed = seed
    self.local_batch_size = local_batch_size
    self.offset = process_index * local_batch_size

  def __call__(self, position: int) -> tuple[np.ndarray, Any, np.int32]:
    step, slot = divmod(int(position), self.local_batch_size)
    slot += self.offset  # position within the global batch
    record = int(self.sampler[step][slot])
    rng = np.random.default_rng([self.seed, _AUGMENT_STREAM, step, slot])
    pixels, box = self.transform.geometry(self.source[record]["image"], rng)
    return pixels, box, np.int32(self.labels[record])


class _EvalElement:
  """Process-local position -> (uint8 pixels or None past the end, index)."""

  def __init__(self, source, transform, *, num_records, global_batch_size,
               local_batch_size, process_index):
    self.source = source
    self.transform = transform
    self.num_records = num_records
    self.global_batch_size = global_batch_size
    self.local_batch_size = local_batch_size
    self.offset = process_index * local_batch_size

  def __call__(self, position: int) -> tuple[np.ndarray | None, int]:
    step, slot = divmod(int(position), self.local_batch_size)
    index = step * self.global_batch_size + self.offset + slot
    if index < self.num_records:
      return self.transform.geometry(self.source[index]["image"]), index
    return None, -1


class _Batcher:
  """grain batch_fn: normalises every element straight into the batch array.

  Elements stay uint8 until here, and the float32 batch is written once, in
  shared memory when a worker hands it to the main process (grain then
  passes a handle instead of copying 50 MB per batch).
  """

  def __init__(self, transform, shared_memory: bool):
    self.transform = transform
    self.shared_memory = shared_memory

  def _images(self, n: int) -> np.ndarray:
    shape = (n, *self.transform.size_hw, 3)
    if self.shared_memory:
      return grain.multiprocessing.SharedMemoryArray(shape, np.float32)
    return np.empty(shape, np.float32)


class _TrainBatcher(_Batcher):

  def __call__(self, elements) -> dict[str, np.ndarray]:
    images = self._images(len(elements))
    for out, (pixels, box, _) in zip(images, elements):
      self.transform.finish(pixels, box, out)
    labels = np.array([label for _, _, label in elements], np.int32)
    return {"image": images, "label": labels}


class _EvalBatcher(_Batcher):

  def __call__(self, elements) -> dict[str, np.ndarray]:
    images = self._images(len(elements))
    for out, (pixels, _) in zip(images, elements):
      if pixels is None:
        out.fill(0.0)  # padding
      else:
        self.transform.normalize(pixels, out)
    index = np.array([i for _, i in elements], np.int32)
    return {"image": images, "mask": index >= 0, "index": index}


def _to_iterator(ds: grain.MapDataset, input_config: Any) -> Iterator[Any]:
  buffer = max(1, int(input_config.prefetch_buffer))
  workers = int(input_config.num_workers)
  # Elements are whole batches: one reader thread per process, a buffer of a
  # few batches (grain's default of 500 batches would hold gigabytes). In worker
  # processes the read-ahead is the queue to the main process alone: a batch a
  # worker made ahead into its own buffer is dropped at shutdown without freeing its
  # shared memory.
  it_ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=1, prefetch_buffer_size=0 if workers > 0 else buffer))
  if workers > 0:
    it_ds = it_ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=workers,
                                     per_worker_buffer_size=buffer),
        worker_init_fn=functools.partial(_start_worker, parent_pid=os.getpid()),
    )
    with _stop_signals_blocked():
      return _WorkerBatches(iter(it_ds))
  return iter(it_ds)


@contextlib.contextmanager
def _stop_signals_blocked() -> Iterator[None]:
  """SIGINT and SIGTERM wait (blocked) in this thread while the block runs.

  Threads started meanwhile inherit the blocked signals, and so do the processes they
  spawn (a signal mask survives fork and exec).
  """
  if not hasattr(signal, "pthread_sigmask"):  # not POSIX
    yield
    return
  old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
  try:
    yield
  finally:
    signal.pthread_sigmask(signal.SIG_SETMASK, old)


class _WorkerBatches:
  """grain's multi-process iterator, created and advanced with the stop signals blocked.

  grain starts its helper threads, and they the worker processes, while the iterator
  is created and advanced: those start with SIGINT and SIGTERM blocked until
  `_start_worker` ignores them, so a Ctrl-C that reaches the whole process group while
  a worker is still importing cannot kill it. In the calling thread a signal waits for
  the end of one `next`, then is handled as usual.
  """

  def __init__(self, iterator: Iterator[Any]):
    self._iterator = iterator

  def __iter__(self) -> _WorkerBatches:
    return self

  def __next__(self) -> Any:
    with _stop_signals_blocked():
      return next(self._iterator)

  def close(self) -> None:
    """Stops the workers; returns once the shared memory of every batch is freed."""
    if self._iterator is None:
      return
    self._iterator.close()
    # Batches already in this process are freed as they are dropped, by grain's
    # deletion thread; those held in grain's reference cycles are dropped by a
    # collection. A task queued behind them returns once that thread has caught up,
    # so an exit right after this cannot leave shared memory behind.
    self._iterator = None
    gc.collect()
    pool = getattr(grain.multiprocessing.SharedMemoryArray, "_del_thread_pool", None)
    if pool is not None:
      pool.apply(int)


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
) -> grain.MapDataset:
  """The training MapDataset of this process's batches, indexed by step.

  shared_memory: build batches in shared memory (for grain worker processes).
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
  local = _check_split(global_batch_size, process_index, process_count)
  sampler = sampling.PKSampler(labels, num_ids=p, num_instances=k, seed=seed)
  transform = augment.TrainTransform.from_config(input_config)
  element = _TrainElement(
      source, labels, sampler, transform, seed=seed, local_batch_size=local,
      process_index=process_index)
  ds = grain.MapDataset.range(_MAX_STEPS * local).map(element)
  return ds.batch(local, drop_remainder=True,
                  batch_fn=_TrainBatcher(transform, shared_memory))


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
) -> Iterator[dict[str, np.ndarray]]:
  """Endless PK training batches from global step `start_step`.

  Yields {"image": float32 (b, H, W, 3) normalised, "label": int32 (b,)},
  b = global_batch_size / process_count: rows [process_index * b, ...) of
  each global batch. `labels` (from datasets.split_index) gives each record's
  label without reading images.
  """
  if start_step < 0:
    raise ValueError(f"start_step={start_step} must be >= 0.")
  ds = train_dataset(source, labels, input_config, seed=seed,
                     global_batch_size=global_batch_size,
                     process_index=process_index, process_count=process_count,
                     shared_memory=input_config.num_workers > 0)
  return _to_iterator(ds[start_step:], input_config)


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

  Yields {"image": float32 (b, H, W, 3), "mask": bool (b,), "index": int32
  (b,)} with b = batch_size / process_count; the last global batch is padded
  with zero images, mask False and index -1. `index` is the record's position
  in `source` (global), so gathered rows can be matched to split_index.
  """
  local = _check_split(batch_size, process_index, process_count)
  n = len(source)
  steps = num_eval_batches(n, batch_size)
  transform = augment.TestTransform.from_config(input_config)
  element = _EvalElement(
      source, transform, num_records=n, global_batch_size=batch_size,
      local_batch_size=local, process_index=process_index)
  batcher = _EvalBatcher(transform, input_config.num_workers > 0)
  ds = grain.MapDataset.range(steps * local).map(element)
  ds = ds.batch(local, batch_fn=batcher)
  return _to_iterator(ds, input_config)


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
