"""Process set-up shared by every entry point: main, the demo and the user tools.

    runtime.setup(config)   # at the start of main(), before anything imports TensorFlow

- TensorFlow (imported by tfds and clu for file and summary I/O) never takes GPU memory
  from JAX and keeps its C++ logging quiet;
- the INFO chatter of Orbax, grain and tfds is dropped from the absl log;
- absl flags count as parsed in tools that parse their own arguments (argparse): grain
  reads its flags when it starts worker processes;
- with a config: XLA's persistent compilation cache (a restart skips compiling) and the
  multi-process start-up (`config.distributed`).
`make_mesh` is the one data-parallel mesh of training and evaluation. `print_error` is
how every entry point reports an error a user can act on (`USER_ERRORS`): one line,
`error: ...`, with the traceback only when asked for (--verbose); `run_entry_point`
also turns a requested stop (`Stopped`) or Ctrl-C into a message and an exit code.
`StopRequests` lets a loop stop cleanly on the first SIGINT/SIGTERM and leaves the
second to the system (the process ends at once).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any

import jax
from absl import flags
from absl import logging
from etils import epath



def hide_gpus_from_tensorflow() -> None:
  """TensorFlow must not take GPU memory from JAX (it is only used for I/O here)."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
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


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
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


# Errors a user can act on: a bad value or key, a missing, unreadable or foreign file,
# a busy workdir, a diverged run. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, ImportError, FloatingPointError)


class Stopped(Exception):
  """A run that stopped as it was asked to (a signal), its work saved."""

  def __init__(self, message: str, exit_code: int):
    super().__init__(message)
    self.exit_code = exit_code


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


def print_error(error: BaseException, *, verbose: bool = False) -> None:
  """Prints `error: <message>` to stderr, after the traceback when `verbose`."""
  if verbose:
    traceback.print_exception(error)
  print(f"error: {error}", file=sys.stderr, flush=True)


def run_entry_point(fn: Callable[[], Any], *, verbose: bool = False) -> Any:
  """Returns fn(); exits with one line on an error a user can act on, a stop or Ctrl-C.

  Exit codes: 1 for an error, 128 + the signal number for a stop, 130 for Ctrl-C.
  """
  try:
    return fn()
  except Stopped as e:
    print(e, file=sys.stderr, flush=True)
    sys.exit(e.exit_code)
  except KeyboardInterrupt:
    print("Interrupted.", file=sys.stderr, flush=True)
    sys.exit(130)
  except USER_ERRORS as e:
    print_error(e, verbose=verbose)
    sys.exit(1)


def add_verbose_arg(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--verbose", action="store_true",
                      help="On an error, print its traceback too.")


# --------------------------------------------------------------------------
# Command-line flags of the absl entry points (main, demo).


def exit_with_error(message: str, code: int = 2) -> None:
  """A usage error: `error: <message>` and exit."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def _config_spec(argv) -> str | None:
  """The value of --config (file[:args]) on the command line."""
  spec = None
  for i, arg in enumerate(argv[1:], start=1):
    if arg == "--config" and i + 1 < len(argv):
      spec = argv[i + 1]
    elif arg.startswith("--config="):
      spec = arg[len("--config="):]
  return spec


def _config_file(argv) -> object | None:
  """The config named by --config, loaded again to name its fields in an error."""
  spec = _config_spec(argv)
  if not spec:
    return None
  path, _, arg = spec.partition(":")
  try:
    module_spec = importlib.util.spec_from_file_location("_config_for_error", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)
  except Exception:  # pylint: disable=broad-except  # the flag error is reported anyway
    return None


def _config_override_error(argv) -> str | None:
  """Names the first --config.<a>.<b> override that is not a field of the config."""
  config = _config_file(argv)
  if config is None:
    return None
  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    parts = arg[len("--config."):].split("=", 1)[0].split(".")
    node = config
    for i, part in enumerate(parts):
      fields = sorted(node.keys()) if hasattr(node, "keys") else []
      if part not in fields:
        where = ".".join(parts[:i]) or "the config"
        expected = (f"its fields are {', '.join(fields)}" if fields
                    else f"{where} is a value, not a section")
        return f"{arg}: unknown config key; {where} has no field {part!r} ({expected})."
      node = node[part]
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing for app.run(flags_parser=...): a bad flag, config file or
  --config.<key> override is reported in one line, naming the key and the fields there
  are."""
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  try:
    remaining = FLAGS(argv)
    FLAGS.config.keys()  # a config file that failed to load raises only when used
    return remaining
  except OSError as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    exit_with_error(f"--config={_config_spec(argv)}: {lines[-1]}")
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    message = str(e)
    if "Error whilst parsing config file" in message:  # the config module's own error
      lines = [line.strip() for line in message.splitlines() if line.strip()]
      message = f"{lines[0].split(':')[0]}: {lines[-1]}"
    elif not isinstance(e, flags.IllegalFlagValueError):
      message = _config_override_error(argv) or message
    exit_with_error(message.strip().strip('"'))
