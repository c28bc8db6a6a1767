"""Test-session set-up: CPU only, 8 fake devices for the sharding tests.

The environment must be set before jax is imported anywhere, so this runs first.
"""

import os

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
# TensorFlow (imported by tfds and clu) must never grab a GPU.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# torch (through torchvision -> triton) segfaults when its native libraries load after
# those of the jax/TensorFlow stack; loading it first, where installed, avoids that.
try:
  import torchvision  # noqa: E402,F401
except ImportError:
  pass

from absl import flags  # noqa: E402

# grain reads absl flags; outside app.run they must be marked as parsed.
flags.FLAGS.mark_as_parsed()
