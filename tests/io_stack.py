"""A subprocess environment without the I/O stack, as on a bare GPU image.

The numerical core (everything under musp_jax/runtime, models, core and retrieval) and
scripts/gpu_check.py must run where TensorFlow, tensorflow-datasets, grain and clu are
not installed. `blocked_env` returns an environment whose Python refuses to
import them (a sitecustomize module marks them absent), so a test sees any import of
them, however indirect.
"""

import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
BLOCKED = ("tensorflow", "tensorflow_datasets", "grain", "clu", "array_record")

# A None entry in sys.modules is how Python marks a module as absent: `import` raises
# ModuleNotFoundError and importlib.util.find_spec returns None, as for a package that
# is not installed (libraries probe for optional ones with find_spec).
_SITECUSTOMIZE = f'''
import sys

for name in {BLOCKED!r}:
  sys.modules[name] = None
'''


def blocked_env(tmp_path: pathlib.Path, **extra: str) -> dict[str, str]:
  """os.environ + CPU-only JAX + a sitecustomize that refuses BLOCKED imports."""
  site = tmp_path / "blocked_site"
  site.mkdir(exist_ok=True)
  (site / "sitecustomize.py").write_text(_SITECUSTOMIZE)
  pythonpath = os.pathsep.join([str(site), str(ROOT)])
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": "",
         "PYTHONPATH": pythonpath, **extra}
  env.pop("XLA_FLAGS", None)  # conftest's 8 fake devices are for the test process
  return env
