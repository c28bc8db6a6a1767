"""The numerical core: losses, optimizer, train state and step, preprocessing, the feature function (jax, flax, optax only)."""
