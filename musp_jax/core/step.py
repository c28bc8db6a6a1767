"""The pure train step and its one jitted, sharded, donated form.

`train_step(state, batch, *, model, tx, loss_config, input_config)` is a pure function
of its arguments; `jit_step` is how training, the scaling script and the train-step
benchmark all compile it, so the three measure and run the same program. The batch
arrives as the input pipeline makes it (uint8 images, erase boxes, labels); the step
normalises and erases on the device (preprocess.train_images).
"""

from __future__ import annotations

import functools

import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from musp_jax.core import losses
from musp_jax.core import optim
from musp_jax.core import preprocess
from musp_jax.core.state import TrainState


def train_step(state: TrainState, batch: dict, *, model, tx: optax.GradientTransformation,
               loss_config: ml_collections.ConfigDict,
               input_config: ml_collections.ConfigDict) -> tuple[TrainState, dict]:
  """One optimizer step on a global batch; pure, so it jits and shards as a whole.

  batch: {"image": uint8 (B, H, W, 3), "erase": int32 (B, 4), "label": int32 (B,)}.
  """
  images = preprocess.train_images(batch, input_config)

  def loss_fn(params):
    outputs, updates = model.apply(
        {"params": params, "batch_stats": state.batch_stats}, images,
        train=True, mutable=["batch_stats"])
    loss, aux = losses.total_loss(outputs, batch["label"], loss_config)
    return loss, (aux, updates["batch_stats"])

  (loss, (aux, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {**aux, "loss": loss, "grad_norm": optax.tree.norm(grads),
             "lr": optim.current_lr(opt_state)}
  new_state = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                         opt_state=opt_state)
  return new_state, metrics


def jit_step(*, model, tx: optax.GradientTransformation,
             loss_config: ml_collections.ConfigDict,
             input_config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
             state_sharding: jax.sharding.Sharding):
  """`train_step` jitted over `mesh`: batch split on "data", state donated.

  Returns step(state, batch) -> (state, metrics), metrics replicated.
  """
  preprocess.normalize_constants(input_config.normalize)  # a bad name fails here
  return jax.jit(
      functools.partial(train_step, model=model, tx=tx, loss_config=loss_config,
                        input_config=input_config),
      in_shardings=(state_sharding, NamedSharding(mesh, P("data"))),
      out_shardings=(state_sharding, NamedSharding(mesh, P())),
      donate_argnums=0)


def random_batch(rng: np.random.Generator, batch_size: int, image_hw: tuple[int, int],
                 num_classes: int, num_instances: int = 4) -> dict[str, np.ndarray]:
  """A host batch in the input pipeline's format, of random pixels (benchmarks, scaling).

  Identities come in groups of `num_instances` as the PK sampler makes them; half the
  images carry an erase box.
  """
  h, w = image_hw
  erased = rng.random(batch_size) < 0.5
  bh, bw = rng.integers(1, h // 2 + 1, batch_size), rng.integers(1, w // 2 + 1, batch_size)
  boxes = np.stack([rng.integers(0, h - bh + 1), rng.integers(0, w - bw + 1), bh, bw], -1)
  labels = np.arange(batch_size) // num_instances % num_classes
  return {"image": rng.integers(0, 256, (batch_size, h, w, 3), dtype=np.uint8),
          "erase": np.where(erased[:, None], boxes, 0).astype(np.int32),
          "label": labels.astype(np.int32)}
