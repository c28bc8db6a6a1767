"""The numerical core: losses, optimizer, train state and step, preprocessing, and the
one feature function. jax, flax and optax only (no TensorFlow, tfds, grain or clu), so it
runs on a GPU image that has nothing else (tests/test_core_imports.py)."""
