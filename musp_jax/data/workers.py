"""grain worker processes of the input pipelines, and the shared memory of their batches.

Workers are spawned processes; they import the pipeline's modules, numpy, OpenCV and
grain (which imports JAX without using it), hide accelerators first, ignore Ctrl-C and
SIGTERM (the training process stops them) and exit when the training process is gone
(`_start_worker`). A worker builds each batch's arrays in shared memory
(`shared_array`), which grain hands to the main process by name instead of copying, and
reuses a batch's memory once the main process has released it (`_SharedBatchMemory`).
`iterate` starts the workers with the stop signals blocked and returns the iterator
whose `close` stops them and frees that memory.
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
from typing import Any, Iterator

import cv2
import grain
import jax
import numpy as np

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
  os._exit(1)


class _LentSegment(shared_memory.SharedMemory):
  """A worker's private segment, seen under the public name it is lent out as.

  Closing it (grain does, when the worker drops its array) releases only this view,
  never the worker's mapping, which the next batch reuses.
  """

  # No SharedMemory.__init__: this object maps nothing, it views `private`'s memory.
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


def shared_array(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
  global _shared_batch_memory
  if _shared_batch_memory is None:
    _shared_batch_memory = _SharedBatchMemory(_MAX_LENT_BATCHES)
  return _shared_batch_memory.array(shape, dtype)


def iterate(ds: grain.MapDataset, input_config: Any) -> Iterator[Any]:
  """The batches of `ds`, read by input_config.num_workers worker processes (0: here)."""
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
