"""The pure train step and its one jitted, sharded, donated form.

`train_step(state, batch, *, model, tx, loss_config)` is a pure function of its
arguments; `jit_step` is how training, the scaling script and the train-step benchmark
all compile it, so the three measure and run the same program.
"""

from __future__ import annotations

import functools

import jax
import ml_collections
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from musp_jax import losses
from musp_jax import optim
from musp_jax.state import TrainState


def train_step(state: TrainState, batch: dict, *, model, tx: optax.GradientTransformation,
               loss_config: ml_collections.ConfigDict) -> tuple[TrainState, dict]:
  """One optimizer step on a global batch; pure, so it jits and shards as a whole."""

  def loss_fn(params):
    outputs, updates = model.apply(
        {"params": params, "batch_stats": state.batch_stats}, batch["image"],
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
             loss_config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
             state_sharding: jax.sharding.Sharding):
  """`train_step` jitted over `mesh`: batch split on "data", state donated.

  Returns step(state, batch) -> (state, metrics), metrics replicated.
  """
  return jax.jit(
      functools.partial(train_step, model=model, tx=tx, loss_config=loss_config),
      in_shardings=(state_sharding, NamedSharding(mesh, P("data"))),
      out_shardings=(state_sharding, NamedSharding(mesh, P())),
      donate_argnums=0)
