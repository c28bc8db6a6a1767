"""Process set-up shared by every entry point: main, the demo and the user tools.

    runtime.setup(config)   # at the start of main(), before anything imports TensorFlow

- TensorFlow (imported by tfds and clu for file and summary I/O) never takes GPU memory
  from JAX and keeps its C++ logging quiet;
- the INFO chatter of Orbax, grain and tfds is dropped from the absl log;
- with a config: XLA's persistent compilation cache (a restart skips compiling) and the
  multi-process start-up (`config.distributed`).
`make_mesh` is the one data-parallel mesh of training and evaluation.
"""

from __future__ import annotations

import os
from typing import Any

import jax
from absl import logging
from etils import epath

from musp_jax import distributed


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
    distributed.initialize()


def setup(config: Any = None) -> None:
  """Everything an entry point does first; `config` (a run config) is optional."""
  hide_gpus_from_tensorflow()
  quiet_library_logs()
  if config is not None:
    configure_jax(config)


def make_mesh() -> jax.sharding.Mesh:
  """A 1-D data-parallel mesh over every device of every process."""
  return jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
