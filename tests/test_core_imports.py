"""The package's layout, checked: its layers import only the layers below them, the
numerical core imports and runs with TensorFlow, tfds, grain and clu refused, and README's
map lists every module."""

import ast
import json
import pathlib
import re
import subprocess
import sys

import pytest

import io_stack

PACKAGE = io_stack.ROOT / "musp_jax"
# What each layer may import from the package (besides itself); the commands at the top
# may import any layer. README, "Map of the package".
LAYERS = {
    "runtime": set(),
    "models": set(),
    "core": {"models"},
    "data": set(),
    "retrieval": {"runtime", "models", "core"},
    "training": {"runtime", "models", "core", "data", "retrieval"},
    "serving": {"runtime", "models", "core", "data", "retrieval", "training"},
}
# The rule of the numerical core is a path rule: everything under these folders.
NO_IO_STACK = ("runtime", "models", "core", "retrieval")
COMMANDS = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}


def _modules(folder: str) -> list[str]:
  return sorted("musp_jax." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts)
                .removesuffix(".__init__") for p in (PACKAGE / folder).rglob("*.py"))


def _imports(path: pathlib.Path) -> set[str]:
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names.update(f"{node.module}.{a.name}" for a in node.names)
  return names


def test_top_of_the_package_holds_only_the_commands_and_the_layers():
  assert sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"
                ) == sorted(LAYERS)
  # Each command runs as `python -m musp_jax.X` (compat is imported by its documented path).
  for name in COMMANDS - {"compat"}:
    assert 'if __name__ == "__main__":' in (PACKAGE / f"{name}.py").read_text(), name


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_layers_import_only_the_layers_below(layer):
  problems = []
  for path in sorted((PACKAGE / layer).rglob("*.py")):
    for name in _imports(path):
      parts = name.split(".")
      where = path.relative_to(io_stack.ROOT)
      if parts[0] == "configs":
        problems.append(f"{where} imports the experiment configs ({name})")
      elif name.startswith("tfds_builders.synthetic_vehicles.render"):
        problems.append(f"{where} imports the synthetic renderer")
      elif parts[0] == "musp_jax" and len(parts) > 1:
        if parts[1] in COMMANDS:
          problems.append(f"{where} imports the command module musp_jax.{parts[1]}")
        elif parts[1] in LAYERS and parts[1] != layer and parts[1] not in LAYERS[layer]:
          problems.append(f"{where} imports {name}, a layer above {layer}")
  assert not problems, "\n".join(problems)


def test_nothing_in_the_package_imports_configs_or_the_renderer():
  """The experiment configs and the synthetic renderer sit above the package: the commands
  read a config file by its path (--config) and datasets through their builders."""
  problems = [f"{p.relative_to(io_stack.ROOT)}: {name}" for p in sorted(PACKAGE.rglob("*.py"))
              for name in _imports(p)
              if name.split(".")[0] == "configs" or ".render" in name]
  assert not problems


_PROGRAM = f'''
import importlib, json, sys
for name in {[m for f in NO_IO_STACK for m in _modules(f)]
              + ["musp_jax.export", "configs.common"]!r}:
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
from musp_jax.core import features
from musp_jax.core import optim
from musp_jax.core import state
from musp_jax.core import step
from musp_jax.models import build_model
from musp_jax.retrieval import ranking
from musp_jax.retrieval import reference
from musp_jax.retrieval import saved_features
from musp_jax.runtime import process

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


mesh = process.make_mesh()
tx = optim.make_optimizer(c.optim, 10)
st, sharding = state.create_train_state(Tiny(), tx, (32, 32), seed=0, mesh=mesh)
train_step = step.jit_step(model=Tiny(), tx=tx, loss_config=c.loss, input_config=c.input,
                           mesh=mesh, state_sharding=sharding)
st, m = train_step(st, batch)
st, m2 = train_step(st, batch)
rng = np.random.default_rng(1)
q = saved_features.Features(np.asarray(feats), np.asarray(areas), np.arange(8) % 4,
                            np.zeros(8, int))
g = saved_features.Features(np.asarray(feats)[::-1], np.asarray(areas)[::-1],
                            np.arange(8)[::-1] % 4, np.ones(8, int))
got = ranking.evaluate(q, g)
want = reference.rank_metrics(ranking.distance_matrix(q, g), q.ids, g.ids, q.cams, g.cams)
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


def test_readme_map_lists_every_module():
  text = (io_stack.ROOT / "README.md").read_text()
  block = text[text.index("    musp_jax/\n"):text.index("    configs/ ")]
  listed, folder = set(), ""
  for line in block.splitlines()[1:]:
    m = re.match(r"^( {6}| {8})(\S+)", line)
    if not m:
      continue
    name = m.group(2)
    if name.endswith("/"):
      folder = name
    elif name.endswith(".py"):
      listed.add(folder + name if len(m.group(1)) == 8 else name)
  modules = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
             if p.name != "__init__.py" or p.parent.name == "models"}
  assert listed == modules, (sorted(modules - listed), sorted(listed - modules))
