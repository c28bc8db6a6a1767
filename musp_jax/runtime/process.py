"""Process set-up shared by every entry point: main, the demo and the user tools.

    process.setup(config)   # at the start of main(), before anything imports TensorFlow

- TensorFlow (imported by tfds and clu for file and summary I/O) never takes GPU memory
  from JAX and keeps its C++ logging quiet;
- the INFO chatter of Orbax, grain and tfds is dropped from the absl log;
- absl flags count as parsed in tools that parse their own arguments (argparse): grain
  reads its flags when it starts worker processes;
- with a config: XLA's persistent compilation cache (a restart skips compiling) and the
  multi-process start-up (`config.distributed`).
`make_mesh` is the one data-parallel mesh of training, evaluation and ranking.
`StopRequests` lets a loop stop cleanly on the first SIGINT/SIGTERM and leaves the
second to the system (the process ends at once). How a tool ends (its error line and
exit code) is musp_jax/runtime/cli.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import Any

import jax
from absl import flags
from absl import logging
from etils import epath


def hide_gpus_from_tensorflow() -> None:
  """TensorFlow must not take GPU memory from JAX (it is only used for I/O here)."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  try:
    import tensorflow as tf
  except ImportError:  # the numerical core runs without TensorFlow
    return
  tf.config.set_visible_devices([], "GPU")


class _QuietLibraries:
  """Drops the INFO chatter of Orbax, grain and tfds (every save logs dozens of lines)."""

  def filter(self, record) -> bool:
    noisy = ("/orbax/", "/grain/", "/tensorflow_datasets/")
    if not any(p in record.pathname for p in noisy):
      return True
    # Saves between evaluations carry no mAP by design; Orbax warns about each one.
    return record.levelno > 20 and "tracked_metric" not in record.getMessage()


def quiet_library_logs() -> None:
  """Keeps the console to this project's progress."""
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())


def configure_jax(config: Any) -> None:
  """Process-wide JAX settings of a run config: compile cache, multi-host start-up."""
  if config.compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir",
                      str(epath.Path(config.compilation_cache_dir).expanduser()))
  if config.distributed and not jax.distributed.is_initialized():
    initialize_distributed()


ENV_ADDRESS = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """`jax.distributed.initialize` with arguments, environment variables or auto-detection."""
  coordinator_address = coordinator_address or os.environ.get(ENV_ADDRESS)
  if num_processes is None and ENV_NUM_PROCESSES in os.environ:
    num_processes = int(os.environ[ENV_NUM_PROCESSES])
  if process_id is None and ENV_PROCESS_ID in os.environ:
    process_id = int(os.environ[ENV_PROCESS_ID])
  given = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in given) and any(v is None for v in given):
    raise ValueError(
        f"Multi-process start-up needs all of {ENV_ADDRESS}, {ENV_NUM_PROCESSES} and "
        f"{ENV_PROCESS_ID} (or arguments); got address={coordinator_address!r}, "
        f"num_processes={num_processes!r}, process_id={process_id!r}.")
  # With nothing given, JAX detects SLURM / Open MPI / TPU environments itself.
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)


def setup(config: Any = None) -> None:
  """Everything an entry point does first; `config` (a run config) is optional."""
  hide_gpus_from_tensorflow()
  quiet_library_logs()
  if not flags.FLAGS.is_parsed():  # an absl app has parsed them already
    flags.FLAGS.mark_as_parsed()
  if config is not None:
    configure_jax(config)


def make_mesh() -> jax.sharding.Mesh:
  """A 1-D data-parallel mesh over every device of every process."""
  return jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))


class StopRequests(contextlib.AbstractContextManager):
  """SIGINT/SIGTERM handlers for a loop that stops cleanly (training's).

  The first signal sets `signum`: the loop finishes its step, saves and stops. The
  handlers are then back to the system's default, so a second signal ends the process
  at once, wherever it is (also inside a long device call, where a Python handler
  would wait).
  """

  SIGNALS = (signal.SIGINT, signal.SIGTERM)

  def __init__(self):
    self.signum: int | None = None
    self._previous: dict = {}

  def __enter__(self) -> StopRequests:
    try:
      self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
    except ValueError:  # not the main thread: signals stay as they are
      self._previous = {}
    return self

  def _handle(self, signum, frame) -> None:
    del frame
    self.signum = signum
    for s in self.SIGNALS:
      signal.signal(s, signal.SIG_DFL)
    print(f"\n{signal.Signals(signum).name} received: finishing the current step and "
          "saving it (Ctrl-C again to stop at once, without saving).", file=sys.stderr,
          flush=True)

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
