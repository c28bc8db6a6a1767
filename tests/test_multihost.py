"""Two JAX processes on localhost train exactly like one process with the same global batch.

Each process feeds only its half of every global batch
(`jax.make_array_from_process_local_data`); the project's own train_step,
losses and optimizer run on a mesh that spans both processes, and BatchNorm
statistics are over the global batch. The losses must equal those of a single
process that sees the whole batch.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from musp_jax import distributed
from musp_jax.runtime import process

GLOBAL_BATCH = 8
STEPS = 3
# The worker runs in a fresh interpreter (jax must start with its own device
# settings), importing this file by path.
_WORKER = """
import sys
sys.path.insert(0, {tests_dir!r})
import test_multihost
test_multihost.worker({out!r}, {distributed!r})
"""


def worker(out_path: str, use_distributed: bool) -> None:
  """Trains a tiny re-ID model for STEPS steps; process 0 writes the losses as JSON."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from configs import common
  from musp_jax.core import optim
  from musp_jax.runtime import process
  from musp_jax.core import state as state_lib
  from musp_jax.core import step as step_lib

  if use_distributed:
    process.initialize_distributed()  # From the JAX_* variables set by launch_local.

  class TinyReID(nn.Module):
    """Conv + BatchNorm + two branches: the output dict total_loss expects."""

    @nn.compact
    def __call__(self, x, *, train=False):
      x = nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)))(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
      feats = nn.Dense(2 * 8)(jnp.mean(x, axis=(1, 2))).reshape(-1, 2, 8)
      return {"feats": feats, "logits": nn.Dense(4)(feats),
              "diversity": jnp.zeros((), jnp.float32)}

  c = common.get_config()
  c.optim.lr = 1e-2
  model = TinyReID()
  tx = optim.make_optimizer(c.optim, steps_per_epoch=10)
  mesh = process.make_mesh()
  state, state_sharding = state_lib.create_train_state(model, tx, (8, 8), seed=0, mesh=mesh)
  batch_sharding = NamedSharding(mesh, P("data"))
  step = step_lib.jit_step(model=model, tx=tx, loss_config=c.loss, input_config=c.input,
                           mesh=mesh, state_sharding=state_sharding)
  rng = np.random.default_rng(0)
  per_process = GLOBAL_BATCH // jax.process_count()
  rows = slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
  losses, stats = [], None
  for _ in range(STEPS):
    # Every process draws the same global batch and keeps only its rows.
    host = step_lib.random_batch(rng, GLOBAL_BATCH, (8, 8), 4, num_instances=2)
    batch = {k: jax.make_array_from_process_local_data(batch_sharding, v[rows], v.shape)
             for k, v in host.items()}
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  stats = jax.tree.map(lambda v: np.asarray(v).tolist(), state.batch_stats)
  if jax.process_index() == 0:
    pathlib.Path(out_path).write_text(json.dumps({
        "losses": losses, "batch_stats": stats, "process_count": jax.process_count(),
        "device_count": jax.device_count()}))


def _env(devices_per_process: int) -> dict[str, str]:
  root = pathlib.Path(__file__).resolve().parents[1]
  return {
      "JAX_PLATFORMS": "cpu",
      # conftest's 8 fake devices are for this process; each worker sets its own.
      "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
      "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
      "CUDA_VISIBLE_DEVICES": "",
  }


def _command(out: pathlib.Path, use_distributed: bool) -> list[str]:
  code = _WORKER.format(tests_dir=str(pathlib.Path(__file__).parent), out=str(out),
                        distributed=use_distributed)
  return [sys.executable, "-c", code]


def test_two_processes_match_one_process(tmp_path):
  single, multi = tmp_path / "single.json", tmp_path / "multi.json"
  # Reference: one process with two devices, the same 2-way data-parallel mesh.
  subprocess.run(_command(single, False), env={**os.environ, **_env(2)}, check=True,
                 timeout=300)
  try:
    distributed.launch_local(_command(multi, True), 2, env=_env(1), timeout=300,
                             capture=True)
  except subprocess.CalledProcessError as e:
    raise AssertionError(f"{e.cmd} failed:\n{e.stderr}") from e
  one, two = json.loads(single.read_text()), json.loads(multi.read_text())
  assert (one["process_count"], one["device_count"]) == (1, 2)
  assert (two["process_count"], two["device_count"]) == (2, 2)
  assert len(two["losses"]) == STEPS and np.all(np.isfinite(two["losses"]))
  # The model learns (the losses move), identically in both set-ups.
  assert two["losses"][0] != two["losses"][-1]
  # Two processes or one, the same global float32 sums split differently: a few ulps
  # a step, compounding over STEPS steps (measured equal here): rtol 1e-5.
  np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5)
  # BatchNorm statistics were taken over the global batch in both.
  leaves_two, leaves_one = jax.tree.leaves(two["batch_stats"]), jax.tree.leaves(
      one["batch_stats"])
  assert len(leaves_two) == len(leaves_one) > 0
  # The same global statistics, summed over one process or two: as the losses above
  # (atol for statistics near 0); measured equal.
  np.testing.assert_allclose(leaves_two, leaves_one, rtol=1e-5, atol=1e-6)


def test_initialize_rejects_partial_settings(monkeypatch):
  monkeypatch.setenv(process.ENV_ADDRESS, "127.0.0.1:1234")
  monkeypatch.delenv(process.ENV_NUM_PROCESSES, raising=False)
  monkeypatch.delenv(process.ENV_PROCESS_ID, raising=False)
  with pytest.raises(ValueError, match=process.ENV_NUM_PROCESSES):
    process.initialize_distributed()
