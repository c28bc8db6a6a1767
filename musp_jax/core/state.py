"""The training state and its initialisation (fresh, imported, or abstract for restore).

Kept apart from the training driver so that the step, the checkpoint code and the tools
can use `TrainState` without importing the driver's I/O stack.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P



@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any

  @property
  def variables(self) -> dict:
    return {"params": self.params, "batch_stats": self.batch_stats}


def path_str(keys) -> str:
  """'params/backbone/conv1/kernel': a leaf's key path in a state or variables tree
  (dicts or dataclasses), as optimizer masks and checkpoint reports name it."""
  return jax.tree_util.keystr(keys, simple=True, separator="/")


def init_variables(model, image_size, seed: int) -> dict:
  """Fresh model variables ({"params", "batch_stats"}), initialised in one program."""
  dummy = jnp.zeros((1, *image_size, 3), jnp.float32)
  return dict(jax.jit(lambda x: model.init(jax.random.key(seed), x, train=False))(dummy))


def _init_state(model, tx, image_size, seed: int, variables=None) -> TrainState:
  if variables is None:
    variables = init_variables(model, image_size, seed)
  return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                    batch_stats=variables.get("batch_stats", {}),
                    opt_state=tx.init(variables["params"]))


def abstract_train_state(model, tx, image_size, sharding) -> TrainState:
  """Shapes, dtypes and shardings of the state, without computing it (for restore)."""
  shapes = jax.eval_shape(functools.partial(_init_state, model, tx, image_size, 0))
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)


def create_train_state(model, tx, image_size, *, seed: int, mesh,
                       init_variables: Callable[[Any], Any] | None = None
                       ) -> tuple[TrainState, NamedSharding]:
  """Initialises the state directly into replicated device memory. `init_variables`
  maps the fresh variables to the initial ones (model.init_from: the training layer's
  checkpointing.initial_variables merges the weights it names in)."""
  replicated = NamedSharding(mesh, P())
  init = functools.partial(_init_state, model, tx, image_size, seed)
  if init_variables is None:
    return jax.jit(init, out_shardings=replicated)(), replicated
  variables = jax.jit(lambda: init().variables, out_shardings=replicated)()
  variables = jax.device_put(init_variables(variables), replicated)
  return jax.jit(init, out_shardings=replicated)(variables), replicated
