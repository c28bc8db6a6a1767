"""The numerical core imports and runs with TensorFlow, tfds, grain and clu refused."""

import json
import subprocess
import sys

import pytest

import io_stack

_CORE = ("musp_jax.models", "musp_jax.models.weights", "musp_jax.losses", "musp_jax.optim",
         "musp_jax.state", "musp_jax.step", "musp_jax.preprocess", "musp_jax.retrieval",
         "musp_jax.metrics", "musp_jax.rerank", "musp_jax.features", "musp_jax.export",
         "musp_jax.runtime", "configs.common")

_PROGRAM = f'''
import importlib, json, sys
for name in {_CORE!r}:
  importlib.import_module(name)
for name in {io_stack.BLOCKED!r}:  # the finder works: they are refused
  try:
    importlib.import_module(name)
  except ModuleNotFoundError:
    pass
  else:
    raise AssertionError(f"{{name}} was importable")

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from configs import common
from musp_jax import features, metrics, optim, retrieval, runtime, state, step
from musp_jax.models import build_model

c = common.get_config("runlocal")
batch = step.random_batch(np.random.default_rng(0), 8, (32, 32), 4)
model = build_model(c.model, 4)  # MUSP ResNet-18: the forward pass
variables = state.init_variables(model, (32, 32), seed=0)
feats, areas = features.jitted_embed(model, False, c.input.normalize)(variables, batch["image"])


class Tiny(nn.Module):  # the step, with a model that compiles in a second
  @nn.compact
  def __call__(self, x, *, train=False):
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(4, (3, 3))(x)))
    f = nn.Dense(8)(jnp.mean(x, axis=(1, 2))).reshape(-1, 2, 4)
    return {{"feats": f, "logits": nn.Dense(4)(f)}}


mesh = runtime.make_mesh()
tx = optim.make_optimizer(c.optim, 10)
st, sharding = state.create_train_state(Tiny(), tx, (32, 32), seed=0, mesh=mesh)
train_step = step.jit_step(model=Tiny(), tx=tx, loss_config=c.loss, input_config=c.input,
                           mesh=mesh, state_sharding=sharding)
st, m = train_step(st, batch)
st, m2 = train_step(st, batch)
rng = np.random.default_rng(1)
q = retrieval.Features(np.asarray(feats), np.asarray(areas), np.arange(8) % 4, np.zeros(8, int))
g = retrieval.Features(np.asarray(feats)[::-1], np.asarray(areas)[::-1], np.arange(8)[::-1] % 4,
                       np.ones(8, int))
got = retrieval.evaluate(q, g)
want = metrics.rank_metrics(retrieval.distance_matrix(q, g), q.ids, g.ids, q.cams, g.cams)
print(json.dumps({{"loaded": sorted(m for m, v in sys.modules.items()
                             if m.split(".")[0] in {io_stack.BLOCKED!r} and v is not None),
                  "feats": list(feats.shape),
                  "norms": np.linalg.norm(np.asarray(feats), axis=-1).tolist(),
                  "losses": [float(m["loss"]), float(m2["loss"])], "step": int(st.step),
                  "mAP": [got["mAP"], want["mAP"]]}}))
'''


def test_core_runs_without_the_io_stack(tmp_path):
  proc = subprocess.run([sys.executable, "-c", _PROGRAM], env=io_stack.blocked_env(tmp_path),
                        cwd=io_stack.ROOT, capture_output=True, text=True, timeout=600,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["loaded"] == []
  assert out["feats"] == [8, 5, 512]  # n = 5 branches of ResNet-18's width
  # A float32 L2 normalisation of 512 values: its rounding random-walks to
  # sqrt(512) u = 1.4e-6 (1e-5 leaves 7x); 256 u = 1.5e-5 only if all err one way.
  assert all(abs(n - 1.0) < 1e-5 for row in out["norms"] for n in row)
  assert out["step"] == 2 and out["losses"][1] != out["losses"][0]
  # The same ranking of 8 random items; float64 metrics from integer ranks.
  assert out["mAP"][0] == pytest.approx(out["mAP"][1], rel=1e-12) and out["mAP"][1] > 0
