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

Workers are spawned processes; they import this module, numpy, OpenCV and
grain (which imports JAX without using it), hide accelerators first, ignore
Ctrl-C and SIGTERM (the training process stops them) and exit when the training
process is gone (`_start_worker`).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import itertools
import math
import os
import signal
import threading
import time
import weakref
from multiprocessing import resource_tracker
from multiprocessing import shared_memory
from typing import Any, Iterator, Sequence

import cv2
import grain
import jax
import numpy as np

from musp_jax.data import augment
from musp_jax.data import sampling

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


class _LentSegment(shared_memory.SharedMemory):
  """A worker's private segment, seen under the public name it is lent out as.

  Closing it (grain does, when the worker drops its array) releases only this view,
  never the worker's mapping, which the next batch reuses.
  """

  # pylint: disable-next=super-init-not-called
  def __init__(self, private: shared_memory.SharedMemory, public: str):
    self._name = "/" + public
    self._fd = -1
    self._mmap = None
    self._size = private.size
    self._buf = memoryview(private.buf)


class _SharedBatchMemory:
  """Batch arrays in shared memory that a worker reuses once the main process is done.

  grain hands a SharedMemoryArray to the main process by name, and the last user
  unlinks that name (grain's contract; its main-process iterator does, when the batch is
  dropped). A fresh 12 MiB segment per batch costs its page faults in the worker, about
  a fifth of decoding the batch (scripts/bench_input.py). So a worker keeps its
  segments mapped under private names and lends each batch under a new public name, a
  hard link to the same memory: once the public name is gone, the segment is free.
  Without hard links in /dev/shm (another OS), or with every segment still lent, a
  batch gets a fresh segment, as grain would make it.
  """

  def __init__(self, max_segments: int):
    self.max_segments = max_segments
    self.segments: list[list] = []  # [private SharedMemory, public name lent last]
    self.serial = itertools.count()
    self.linkable = os.path.isdir(_SHM_DIR)
    self.lock = threading.Lock()
    weakref.finalize(self, _unlink_segments, self.segments)

  def array(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    with self.lock:
      segment = self._free_segment(nbytes) if self.linkable else None
      if segment is not None:
        private = segment[0]
        public = f"{private.name}_{next(self.serial)}"
        try:
          os.link(os.path.join(_SHM_DIR, private.name), os.path.join(_SHM_DIR, public))
        except OSError:
          self.linkable = False
        else:
          segment[1] = public
          # As for any segment grain makes: should the main process never unlink it
          # (batches in flight when the pipeline closes), the tracker does at exit.
          resource_tracker.register("/" + public, "shared_memory")
          return grain.multiprocessing.SharedMemoryArray.from_shared_memory(
              _LentSegment(private, public), shape, dtype)
    return grain.multiprocessing.SharedMemoryArray(shape, dtype)

  def _free_segment(self, nbytes: int) -> list | None:
    for segment in self.segments:
      private, public = segment
      if private.size == nbytes and not os.path.exists(os.path.join(_SHM_DIR, public)):
        return segment
    if len(self.segments) < self.max_segments:
      segment = [shared_memory.SharedMemory(create=True, size=nbytes), ""]
      self.segments.append(segment)
      return segment
    return None


def _unlink_segments(segments: list[list]) -> None:
  for private, _ in segments:
    try:
      private.unlink()
    except OSError:
      pass


_SHM_DIR = "/dev/shm"
# Batches a worker can have lent at once: its output buffer, its read-ahead, and what
# the main process holds (grain's buffer, the batch being copied to the device).
_MAX_LENT_BATCHES = 12
_shared_batch_memory: _SharedBatchMemory | None = None  # one per worker process


def _shared_array(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
  global _shared_batch_memory
  if _shared_batch_memory is None:
    _shared_batch_memory = _SharedBatchMemory(_MAX_LENT_BATCHES)
  return _shared_batch_memory.array(shape, dtype)


def _batch_images(n: int, size_hw: tuple[int, int], shared: bool) -> np.ndarray:
  shape = (n, *size_hw, 3)
  return _shared_array(shape, np.uint8) if shared else np.empty(shape, np.uint8)


class _TrainBatch:
  """Step -> this process's rows of the global PK batch at that step.

  Each image is written into the batch array as it is made (uint8; normalisation
  and erasing run in the jitted step, musp_jax/preprocess.py), so a worker never
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
      # Seeded by position in the global batch: independent of workers and processes.
      rng = np.random.default_rng([self.seed, _AUGMENT_STREAM, step, slot])
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
) -> Iterator[dict[str, np.ndarray]]:
  """Endless PK training batches from global step `start_step`.

  Yields {"image": uint8 (b, H, W, 3), "erase": int32 (b, 4) erase boxes,
  "label": int32 (b,)}, b = global_batch_size / process_count: rows
  [process_index * b, ...) of each global batch. The train step normalises and
  erases on the device (preprocess.train_images). `labels` (from
  datasets.split_index) gives each record's label without reading images.
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

  Yields {"image": uint8 (b, H, W, 3), "mask": bool (b,), "index": int32
  (b,)} with b = batch_size / process_count; the last global batch is padded
  with zero images, mask False and index -1. The feature function normalises
  on the device (features.embed). `index` is the record's position
  in `source` (global), so gathered rows can be matched to split_index.
  """
  local = _check_split(batch_size, process_index, process_count)
  n = len(source)
  steps = num_eval_batches(n, batch_size)
  transform = augment.TestTransform.from_config(input_config)
  ds = grain.MapDataset.range(steps).map(_EvalBatch(
      source, transform, num_records=n, global_batch_size=batch_size,
      local_batch_size=local, process_index=process_index,
      shared_memory=input_config.num_workers > 0))
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
