"""Shared set-up of the user-tool tests: a workdir with an untrained model, images,
and the scripts/ modules loaded by path.

A randomly initialised ResNet-18 is enough to test the tools end to end: its
features are deterministic and differ between images.
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import pathlib
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from configs import synthetic
from musp_jax.training import checkpointing
from musp_jax.core import optim
from musp_jax.core import state as state_lib
from musp_jax.models import build_model

IMAGE_SIZE = (64, 64)
ROOT = pathlib.Path(__file__).resolve().parents[1]

# How far two computations of the shared model's float32 outputs (features, areas) may
# differ: another batch size, another program (export, onnxruntime) or another
# instruction set rounds the same sums in another order (GEMM blocking, vector width,
# fused multiply-add). Bound: K u for the model's longest dot product, layer4's 3x3
# conv, K = 9 x 512 = 4608, u = 2^-24: 2.7e-4, relative to each output vector. The
# measured differences (beside each use) are 1e-7 to 2e-5; an image out of place or a
# bfloat16 round trip errs by 1e-3 or more.
NET_OUTPUT_RTOL = 9 * 512 * 2.0**-24


def assert_net_outputs_close(got, want) -> float:
  """Each vector along the last axis within NET_OUTPUT_RTOL of its length; returns the
  largest relative error (||got - want|| / ||want||)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (got.shape, want.shape)
  error = float(np.max(np.linalg.norm(got - want, axis=-1)
                       / np.maximum(np.linalg.norm(want, axis=-1), 1e-30)))
  assert error < NET_OUTPUT_RTOL, (error, NET_OUTPUT_RTOL)
  return error


def load_script(name: str):
  """scripts/<name>.py as a module (scripts/ is not a package)."""
  spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def tiny_config(head: str = "musp", num_prototypes: int = 3):
  config = synthetic.get_config("runlocal")
  config.input.image_size = IMAGE_SIZE
  config.model.head = head
  config.model.num_prototypes = num_prototypes
  config.eval.batch_size = 8
  return config


def make_workdir(path: pathlib.Path, *, head: str = "musp", num_prototypes: int = 3,
                 num_classes: int = 6, seed: int = 0, step: int = 1) -> pathlib.Path:
  """Writes config.json and one checkpoint of a random model, as training would."""
  config = tiny_config(head, num_prototypes)
  config.seed = seed
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(config.to_json_best_effort(indent=2))
  state = random_state(config, num_classes, seed)
  manager = checkpointing.make_manager(path / "checkpoints")
  run = checkpointing.RunInfo(config, num_classes, tuple(
      (config.dataset.name, v) for v in range(101, 101 + num_classes)))
  checkpointing.save(manager, step, state, next_step=step, run=run)
  manager.wait_until_finished()
  manager.close()
  return path


def random_state(config, num_classes: int, seed: int) -> state_lib.TrainState:
  """A TrainState of random weights, filled in numpy (compiling model.init is slow).

  Kernels ~ N(0, 2 / fan_in), BN scale and variance 1, other arrays 0, so the
  network is well-scaled and its features differ between images.
  """
  model = build_model(config.model, num_classes)
  tx = optim.make_optimizer(config.optim, 1)
  size = tuple(config.input.image_size)
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, *size, 3)), train=False))
  rng = np.random.default_rng(seed)

  def fill(path, x):
    name = jax.tree_util.keystr(path[-1:], simple=True)
    if name == "kernel":
      fan_in = int(np.prod(x.shape[:-1]))
      return (rng.standard_normal(x.shape) * np.sqrt(2.0 / fan_in)).astype(x.dtype)
    if name in ("scale", "var"):
      return np.ones(x.shape, x.dtype)
    return np.zeros(x.shape, x.dtype)

  variables = jax.tree_util.tree_map_with_path(fill, abstract)
  opt_state = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype),
                           jax.eval_shape(tx.init, variables["params"]))
  return state_lib.TrainState(step=np.zeros((), np.int32), params=variables["params"],
                          batch_stats=variables.get("batch_stats", {}),
                          opt_state=opt_state)


def write_images(folder: pathlib.Path, count: int, *, seed: int = 0,
                 suffix: str = ".png") -> list[pathlib.Path]:
  """Distinct images of varying size: noise plus a coloured box each."""
  rng = np.random.default_rng(seed)
  folder.mkdir(parents=True, exist_ok=True)
  paths = []
  for i in range(count):
    h, w = int(rng.integers(40, 90)), int(rng.integers(50, 110))
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    top, left = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
    img[top:top + h // 3, left:left + w // 3] = rng.integers(0, 256, 3, dtype=np.uint8)
    p = folder / f"img_{i:03d}{suffix}"
    Image.fromarray(img).save(p)
    paths.append(p)
  return paths


@functools.cache
def shared_workdir() -> pathlib.Path:
  """One random-weight workdir for all tool tests of a session (built once)."""
  root = pathlib.Path(tempfile.mkdtemp(prefix="musp_tools_"))
  atexit.register(shutil.rmtree, root, ignore_errors=True)
  return make_workdir(root / "workdir")


@functools.cache
def shared_model():
  """The shared workdir's model, loaded once so its jitted functions compile once."""
  from musp_jax.serving import inference
  return inference.load_model(shared_workdir())


@functools.cache
def shared_data_dir() -> str:
  """The tiny synthetic dataset, built once per session in a temporary folder."""
  from musp_jax.data import datasets
  root = tempfile.mkdtemp(prefix="musp_tools_data_")
  atexit.register(shutil.rmtree, root, ignore_errors=True)
  config = tiny_config()
  datasets.ensure_built(config.dataset.name, data_dir=root,
                        builder_config=config.dataset.builder_config)
  return root
