"""bfloat16 compute (model.dtype) trains stably: fp32 parameters, BN statistics and loss."""

import jax
import jax.numpy as jnp
import numpy as np

from configs import common
from musp_jax.core import losses
from musp_jax.core import optim
from musp_jax.core import preprocess
from musp_jax.core import state as state_lib
from musp_jax.core import step as step_lib
from musp_jax.models import build_model

NUM_IDS, PER_ID, SIZE = 4, 4, 32


def _synthetic_batch():
  """Each identity is a colour pattern; its images are noisy, shifted copies.

  uint8 pixels and no erase boxes, as the input pipeline hands batches over.
  """
  rng = np.random.default_rng(0)
  patterns = rng.uniform(-1, 1, (NUM_IDS, SIZE, SIZE, 3)).astype(np.float32)
  images = []
  for i in range(NUM_IDS):
    for _ in range(PER_ID):
      shifted = np.roll(patterns[i], rng.integers(-3, 4, 2), axis=(0, 1))
      images.append(shifted + 0.3 * rng.standard_normal(shifted.shape))
  labels = np.repeat(np.arange(NUM_IDS), PER_ID).astype(np.int32)
  pixels = np.clip(np.round((np.stack(images) + 1.0) * 127.5), 0, 255).astype(np.uint8)
  return {"image": jnp.asarray(pixels), "erase": jnp.zeros((len(labels), 4), jnp.int32),
          "label": jnp.asarray(labels)}


def test_bfloat16_training_is_stable():
  c = common.get_config("runlocal,bf16")
  c.optim.warmup_epochs = 0
  c.optim.lr = 1e-3
  model = build_model(c.model, NUM_IDS)
  tx = optim.make_optimizer(c.optim, steps_per_epoch=100)
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:1])
  state, sharding = state_lib.create_train_state(model, tx, (SIZE, SIZE), seed=0, mesh=mesh)
  batch = _synthetic_batch()

  # The bf16 model's first loss agrees with the same weights computed in fp32.
  c32 = c.copy_and_resolve_references()
  c32.model.dtype = "float32"
  model32 = build_model(c32.model, NUM_IDS)

  @jax.jit
  def forward_losses(variables, batch):
    def loss(m):
      out, _ = m.apply(variables, preprocess.train_images(batch, c.input), train=True,
                       mutable=["batch_stats"])
      return losses.total_loss(out, batch["label"], c.loss)[0]
    return loss(model), loss(model32)
  loss16, loss32 = forward_losses(state.variables, batch)
  assert loss16.dtype == jnp.float32
  # bfloat16 keeps 8 significant bits (2^-9 = 2e-3 a rounding) through ~20 layers:
  # sqrt(20) x 2e-3 = 1e-2 random walk; 0.05. Measured 1.4e-3.
  np.testing.assert_allclose(loss16, loss32, rtol=0.05)

  step = step_lib.jit_step(model=model, tx=tx, loss_config=c.loss, input_config=c.input,
                           mesh=mesh, state_sharding=sharding)
  history = []
  for _ in range(8):
    state, metrics = step(state, batch)
    history.append(float(metrics["loss"]))
  assert np.all(np.isfinite(history)), history
  assert history[-1] < 0.8 * history[0], history
  for tree in (state.params, state.batch_stats):
    assert {leaf.dtype for leaf in jax.tree.leaves(tree)} == {jnp.dtype(jnp.float32)}
