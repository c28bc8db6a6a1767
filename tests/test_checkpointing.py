"""Orbax checkpointing: round trip, retention (latest + best), mismatches named."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from musp_jax import checkpointing


@flax.struct.dataclass
class State:
  step: jax.Array
  params: dict


def _state(i, shape=(3, 2)):
  return State(step=jnp.int32(i), params={"w": jnp.full(shape, float(i)), "b": jnp.arange(2.0)})


def _abstract(shape=(3, 2)):
  return jax.eval_shape(lambda: _state(0, shape))


MODEL = {"depth": 18, "head": "musp", "num_prototypes": 5}


def test_round_trip_keeps_latest_and_best(tmp_path):
  manager = checkpointing.make_manager(tmp_path, keep=2)
  maps = {1: 0.1, 2: 0.9, 3: 0.2, 4: 0.3, 5: None}
  for step, m in maps.items():
    checkpointing.save(manager, step, _state(step), next_step=step + 10, model_config=MODEL,
                       metrics=None if m is None else {"mAP": m})
  manager.wait_until_finished()
  # Latest two (4, 5) plus the best by mAP (2); 1 and 3 are gone.
  assert sorted(manager.all_steps()) == [2, 4, 5]
  assert manager.best_step() == 2
  fresh = checkpointing.make_manager(tmp_path, read_only=True)
  state, step, next_step = checkpointing.restore(fresh, _abstract(), model_config=MODEL)
  assert (step, next_step) == (5, 15)
  np.testing.assert_array_equal(state.params["w"], np.full((3, 2), 5.0))
  state, step, _ = checkpointing.restore(fresh, _abstract(), model_config=MODEL, step=2)
  assert int(state.step) == 2


def test_relative_directory_works(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  manager = checkpointing.make_manager("workdirs/run/checkpoints")
  checkpointing.save(manager, 1, _state(1), next_step=2, model_config=MODEL)
  manager.wait_until_finished()
  assert (tmp_path / "workdirs/run/checkpoints/1").is_dir()
  _, step, next_step = checkpointing.restore(
      checkpointing.make_manager("workdirs/run/checkpoints", read_only=True), _abstract(),
      model_config=MODEL)
  assert (step, next_step) == (1, 2)


def test_other_architecture_is_refused_with_fields_named(tmp_path):
  manager = checkpointing.make_manager(tmp_path)
  checkpointing.save(manager, 1, _state(1), next_step=1, model_config=MODEL)
  manager.wait_until_finished()
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match="model.num_prototypes: checkpoint has 5, config asks 3"):
    checkpointing.restore(manager, _abstract(), model_config={**MODEL, "num_prototypes": 3})


def test_mis_shaped_and_missing_arrays_are_named(tmp_path):
  manager = checkpointing.make_manager(tmp_path)
  checkpointing.save(manager, 1, _state(1), next_step=1, model_config=MODEL)
  manager.wait_until_finished()
  abstract = jax.eval_shape(lambda: State(step=jnp.int32(0),
                                          params={"w": jnp.zeros((3, 3)), "c": jnp.zeros(4)}))
  with pytest.raises(checkpointing.CheckpointMismatchError) as err:
    checkpointing.restore(manager, abstract, model_config=MODEL)
  text = str(err.value)
  assert "shape of params/w: checkpoint (3, 2), model (3, 3)" in text
  assert "missing in checkpoint: params/c (4,)" in text
  assert "not in model: params/b (2,)" in text


def test_missing_step_and_empty_directory_are_clear(tmp_path):
  manager = checkpointing.make_manager(tmp_path / "none")
  with pytest.raises(FileNotFoundError, match="No checkpoint in"):
    checkpointing.restore(manager, _abstract(), model_config=MODEL)
  checkpointing.save(manager, 3, _state(3), next_step=3, model_config=MODEL)
  manager.wait_until_finished()
  with pytest.raises(FileNotFoundError, match=r"saved steps: \[3\]"):
    checkpointing.restore(manager, _abstract(), model_config=MODEL, step=7)
