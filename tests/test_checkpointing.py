"""Orbax checkpointing: round trip, retention (latest + best), mismatches named, and the
one weights loader (self-describing steps, partial restore)."""

import asyncio
import gc
import logging
import re
import shutil
import sys
import time
import types

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from musp_jax.training import checkpointing


@flax.struct.dataclass
class State:
  step: jax.Array
  params: dict
  batch_stats: dict
  opt_state: dict


def _state(i, shape=(3, 2), noise=False):
  """A small state whose arrays tell the step; with `noise`, w is random (it does not
  compress, so its file is large and read in chunks, as a real model's)."""
  w = jnp.full(shape, float(i))
  if noise:
    w = w + jnp.asarray(np.random.default_rng(i).standard_normal(shape), jnp.float32)
  params = {"w": w, "b": jnp.arange(2.0),
            "head": {"classifier": {"kernel": jnp.ones((2, 7))}}}
  return State(step=jnp.int32(i), params=params, batch_stats={"mean": jnp.full(2, -i * 1.0)},
               opt_state={"mu": jax.tree.map(lambda x: x + 100.0, params)})


def _abstract(shape=(3, 2)):
  return jax.eval_shape(lambda: _state(0, shape))


MODEL = {"depth": 18, "head": "musp", "num_prototypes": 5, "value_conv": "depthwise",
         "value_channels": 0}
RUN = checkpointing.RunInfo(
    config=ml_collections.ConfigDict({"model": MODEL, "input": {"image_size": [64, 64]}}),
    num_classes=7, label_identities=(("veri776", 3), ("veri776", 5), ("veri776", 8),
                                     ("vehicle_id", 13), ("vehicle_id", 21),
                                     ("vehicle_id", 34), ("vehicle_id", 55)))


def _save(manager, step, *, state=None, **kw):
  checkpointing.save(manager, step, _state(step) if state is None else state,
                     next_step=kw.pop("next_step", step), run=RUN, **kw)


def test_round_trip_keeps_latest_and_best(tmp_path):
  manager = checkpointing.make_manager(tmp_path, keep=2)
  maps = {1: 0.1, 2: 0.9, 3: 0.2, 4: 0.3, 5: None}
  for step, m in maps.items():
    _save(manager, step, next_step=step + 10, metrics=None if m is None else {"mAP": m})
  manager.wait_until_finished()
  # Latest two (4, 5) plus the best by mAP (2); 1 and 3 are gone.
  assert sorted(manager.all_steps()) == [2, 4, 5]
  assert manager.best_step() == 2
  fresh = checkpointing.make_manager(tmp_path, read_only=True)
  state, step, next_step = checkpointing.restore(fresh, _abstract(), model_config=MODEL)
  assert (step, next_step) == (5, 15)
  np.testing.assert_array_equal(state.params["w"], np.full((3, 2), 5.0))
  np.testing.assert_array_equal(state.opt_state["mu"]["b"], np.arange(2.0) + 100.0)
  state, step, _ = checkpointing.restore(fresh, _abstract(), model_config=MODEL, step=2)
  assert int(state.step) == 2


def test_relative_directory_works(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  manager = checkpointing.make_manager("workdirs/run/checkpoints")
  _save(manager, 1, next_step=2)
  manager.wait_until_finished()
  assert (tmp_path / "workdirs/run/checkpoints/1").is_dir()
  _, step, next_step = checkpointing.restore(
      checkpointing.make_manager("workdirs/run/checkpoints", read_only=True), _abstract(),
      model_config=MODEL)
  assert (step, next_step) == (1, 2)
  assert checkpointing.load_variables("workdirs/run").step == 1


def test_other_architecture_is_refused_with_fields_named(tmp_path):
  manager = checkpointing.make_manager(tmp_path)
  _save(manager, 1)
  manager.wait_until_finished()
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match="model.num_prototypes: checkpoint has 5, config asks 3"):
    checkpointing.restore(manager, _abstract(), model_config={**MODEL, "num_prototypes": 3})
  # value_channels=0 is the backbone's width: the same architecture as an explicit 512.
  checkpointing.restore(manager, _abstract(), model_config={**MODEL, "value_channels": 512})
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match="model.value_channels: checkpoint has 512, config asks 256"):
    checkpointing.restore(manager, _abstract(), model_config={**MODEL, "value_channels": 256})


def test_mis_shaped_and_missing_arrays_are_named(tmp_path):
  manager = checkpointing.make_manager(tmp_path)
  _save(manager, 1)
  manager.wait_until_finished()
  abstract = jax.eval_shape(lambda: State(
      step=jnp.int32(0), params={"w": jnp.zeros((3, 3)), "c": jnp.zeros(4)},
      batch_stats={"mean": jnp.zeros(2)}, opt_state={}))
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
  _save(manager, 3)
  manager.wait_until_finished()
  with pytest.raises(FileNotFoundError, match=r"saved steps: \[3\]"):
    checkpointing.restore(manager, _abstract(), model_config=MODEL, step=7)


def _workdir(tmp_path, steps=(1, 2)):
  manager = checkpointing.make_manager(tmp_path / "w" / "checkpoints")
  for s in steps:
    _save(manager, s)
  manager.wait_until_finished()
  return tmp_path / "w"


def test_load_variables_restores_weights_and_run_only(tmp_path):
  workdir = _workdir(tmp_path)
  restored = checkpointing.load_variables(workdir)
  # The restored tree has no optimizer state or step: a partial restore.
  assert sorted(restored.variables) == ["batch_stats", "params"]
  want = _state(2)
  for a, b in zip(jax.tree.leaves(restored.variables),
                  jax.tree.leaves({"params": want.params, "batch_stats": want.batch_stats})):
    np.testing.assert_array_equal(a, b)
  assert restored.step == 2 and restored.source == str(workdir / "checkpoints" / "2")
  assert restored.run.num_classes == 7
  assert restored.run.label_identities == RUN.label_identities
  assert restored.run.config.model.to_dict() == MODEL


def test_load_variables_accepts_every_way_of_naming_a_step(tmp_path):
  workdir = _workdir(tmp_path)
  by_step_folder = checkpointing.load_variables(workdir / "checkpoints" / "1")
  by_checkpoints = checkpointing.load_variables(workdir / "checkpoints", step=1)
  by_workdir = checkpointing.load_variables(workdir, step=1)
  assert by_step_folder.step == by_checkpoints.step == by_workdir.step == 1
  np.testing.assert_array_equal(by_step_folder.variables["params"]["w"], np.ones((3, 2)))
  with pytest.raises(ValueError, match="folder of step 1, but step 2"):
    checkpointing.load_variables(workdir / "checkpoints" / "1", step=2)
  with pytest.raises(FileNotFoundError, match=r"saved steps: \[1, 2\]"):
    checkpointing.load_variables(workdir, step=5)
  with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
    checkpointing.load_variables(tmp_path)


def _corrupt(step_dir, how) -> str:
  """Damages a saved step; returns the file the error must name (relative)."""
  if how == "truncated":  # every array file cut in half, as a full disk leaves them
    for f in (step_dir / "state").rglob("*"):
      if f.is_file() and f.parent.name == "d":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return ""
  if how == "one_file_cut":  # the largest array file cut in half: a chunk is missing
    f = max((f for f in (step_dir / "state").rglob("*") if f.parent.name == "d"),
            key=lambda f: f.stat().st_size)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return str(f)
  if how == "bad_metadata":
    (step_dir / "state" / "_METADATA").write_text('{"tree_metadata": {"params": ')
  elif how == "no_metadata":
    (step_dir / "state" / "_METADATA").unlink()
  elif how == "no_data":
    shutil.rmtree(step_dir / "data")
  return ""


# Reading a step with a short file fails one tensorstore read of several in flight;
# Orbax closes its event loop on the failure, and the other reads, ending later, would
# report "Event loop is closed" (checkpointing._quiet_abandoned_reads drops those
# reports: here any report left is an error, as every warning).
@pytest.mark.parametrize("how,reason", [
    ("truncated", "is not valid for value of size"),
    ("one_file_cut", "is cut short ("),
    ("bad_metadata", "Expecting value"),
    ("no_metadata", "state/_METADATA (the array tree) is missing"),
    ("no_data", "data/ is missing"),
])
def test_corrupt_latest_step_falls_back_to_the_newest_intact_one(tmp_path, caplog, how,
                                                                 reason):
  directory = tmp_path / "w" / "checkpoints"
  manager = checkpointing.make_manager(directory, keep=3)
  shape = (256, 256) if how == "one_file_cut" else (3, 2)
  states = {step: _state(step, shape, noise=how == "one_file_cut") for step in (1, 2, 3)}
  for step, state in states.items():
    _save(manager, step, state=state)
  manager.wait_until_finished()
  named = _corrupt(directory / "3", how)
  corrupt = f"Checkpoint step 3 in {directory} is corrupt: {named}"

  # The tools and --mode=eval read weights only: a step without `data` is still whole.
  if how != "no_data":
    with caplog.at_level("WARNING"):
      assert checkpointing.load_variables(tmp_path / "w").step == 2
    assert corrupt in caplog.text and reason in caplog.text
    with pytest.raises(checkpointing.CheckpointCorruptError, match=re.escape(reason)):
      checkpointing.load_variables(tmp_path / "w", step=3)  # asked for: no fallback
  caplog.clear()

  # Resuming falls back, sets the step aside, and can save that step again.
  manager = checkpointing.make_manager(directory, keep=3)
  with caplog.at_level("WARNING"):
    state, step, next_step = checkpointing.restore(
        manager, _abstract(shape), model_config=MODEL, set_aside_corrupt=True)
  assert (step, next_step) == (2, 2)
  np.testing.assert_array_equal(state.params["w"], states[2].params["w"])
  (record,) = [r for r in caplog.records if r.levelname == "WARNING"]
  assert "\n" not in record.getMessage()  # one line, naming the step and the file
  assert corrupt in caplog.text and reason in caplog.text
  assert f"moved it to {tmp_path / 'w' / 'corrupt_checkpoints' / '3'}" in caplog.text
  assert "architecture" not in caplog.text and "does not fit" not in caplog.text
  assert sorted(manager.all_steps()) == [1, 2]
  assert (tmp_path / "w" / "corrupt_checkpoints" / "3" / "state").is_dir()
  _save(manager, 3)
  manager.wait_until_finished()
  assert checkpointing.load_variables(tmp_path / "w").step == 3
  time.sleep(0.5)  # the abandoned reads end here, not in the next test
  gc.collect()


def test_reports_of_abandoned_reads_are_dropped_and_others_kept(monkeypatch):
  """What the reads abandoned by a failed restore report is dropped, nothing else."""
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)
  checkpointing._quiet_abandoned_reads()  # pylint: disable=protected-access
  checkpointing._quiet_abandoned_reads()  # installed once  # pylint: disable=protected-access
  loop = asyncio.new_event_loop()
  loop.close()
  closed_loop = []
  for fn in (lambda: loop.call_soon_threadsafe(print),  # what tensorstore's callback does
             lambda: loop.call_soon(print)):  # the same error from elsewhere
    try:
      fn()
    except RuntimeError as e:
      closed_loop.append(e)

  async def read():
    pass

  coroutine = read()
  coroutine.close()
  failed = []
  for cause in (ValueError('OUT_OF_RANGE: Error reading "params.w/0.0" in OCDBT database'),
                GeneratorExit(),  # the reading coroutine closed while it waited
                ValueError("some other value error"), TypeError("a bug")):
    try:
      raise Exception("Encountered error while reading array index") from cause  # pylint: disable=broad-exception-raised
    except Exception as e:  # pylint: disable=broad-exception-caught
      failed.append(e)
  reports = [types.SimpleNamespace(exc_type=type(e), exc_value=e,
                                   exc_traceback=e.__traceback__, err_msg=None, object=obj)
             for e, obj in [(closed_loop[0], None), (closed_loop[1], None),
                            (failed[0], coroutine), (failed[1], coroutine),
                            (failed[0], None), (failed[2], coroutine),
                            (failed[3], coroutine)]]
  for report in reports:
    sys.unraisablehook(report)
  assert seen == [reports[1]] + reports[4:]  # reports 0, 2 and 3 are dropped


def test_asyncio_reports_of_abandoned_reads_are_dropped(caplog):
  """asyncio logs "Task exception was never retrieved" (or "Future ...") for each
  reading task or future a failed restore left behind: dropped when a read error caused
  it, kept otherwise. Real tasks and futures, collected with their exceptions unread."""
  checkpointing._quiet_abandoned_reads()  # pylint: disable=protected-access
  causes = [ValueError('OUT_OF_RANGE: Error reading "params.w/0.0" in OCDBT database'),
            ValueError("some other value error"), TypeError("a bug")]

  async def read(cause):
    raise Exception("Encountered error while reading array index") from cause  # pylint: disable=broad-exception-raised

  loop = asyncio.new_event_loop()
  try:
    with caplog.at_level(logging.ERROR, logger="asyncio"):
      for cause in causes:
        future = loop.create_future()
        future.set_exception(cause)
        task = loop.create_task(read(cause))
        loop.run_until_complete(asyncio.wait([task]))  # done, its exception unread
        del future, task
        gc.collect()
  finally:
    loop.close()
  kept = [(r.getMessage().split()[0], r.exc_info[1]) for r in caplog.records]
  kept = [(kind, error.__cause__ or error) for kind, error in kept]
  assert sorted(kept, key=str) == sorted(
      [(kind, cause) for kind in ("Future", "Task") for cause in causes[1:]], key=str)


def test_every_step_corrupt_is_one_error(tmp_path):
  directory = tmp_path / "checkpoints"
  manager = checkpointing.make_manager(directory)
  for step in (1, 2):
    _save(manager, step)
  manager.wait_until_finished()
  for step in (1, 2):
    _corrupt(directory / str(step), "no_metadata")
  with pytest.raises(checkpointing.CheckpointCorruptError,
                     match=rf"Every checkpoint in {directory} is corrupt \(steps \[1, 2\]"):
    checkpointing.restore(checkpointing.make_manager(directory, read_only=True),
                          _abstract(), model_config=MODEL)


# --------------------------------------------------------------------------
# model.init_from with a training workdir: the merge rule (merge_init).


def _variables(config, num_classes, seed):
  import tools_fixtures
  state = tools_fixtures.random_state(config, num_classes, seed)
  return {"params": state.params, "batch_stats": state.batch_stats}


def _leaves(tree, prefix):
  return {checkpointing.path_str(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(tree)
          if checkpointing.path_str(k).startswith(prefix)}


def _config(**model):
  import tools_fixtures
  config = tools_fixtures.tiny_config()
  config.model.update(model)
  return config


def test_init_from_workdir_takes_backbone_and_head_and_renews_classifiers(tmp_path, caplog):
  import tools_fixtures
  source = tools_fixtures.make_workdir(tmp_path / "src", num_classes=6, seed=1)
  saved = checkpointing.load_variables(source).variables
  config = _config()  # the same MUSP architecture, a dataset of 9 identities
  fresh = _variables(config, 9, seed=2)
  with caplog.at_level("INFO"):
    merged = checkpointing.initial_variables(fresh, source, model_config=config.model)
  for col in ("params", "batch_stats"):
    got, want, new = (_leaves(t[col], "") for t in (merged, saved, fresh))
    assert got.keys() == new.keys()
    for path, value in got.items():
      if path.endswith("classifier/kernel"):  # 6 classes saved, 9 wanted: fresh
        assert want[path].shape[-1] == 6 and value.shape[-1] == 9
        np.testing.assert_array_equal(value, new[path])
      else:  # backbone and the rest of the head: the checkpoint's
        np.testing.assert_array_equal(value, want[path])
  assert "classifiers start fresh" in caplog.text and "6 classes -> 9" in caplog.text
  # Every way of naming the step gives the same weights.
  step_dir = source / "checkpoints" / "1"
  for path in (source / "checkpoints", step_dir):
    again = checkpointing.initial_variables(fresh, path, model_config=config.model)
    np.testing.assert_array_equal(again["params"]["backbone"]["conv1"]["kernel"],
                                  saved["params"]["backbone"]["conv1"]["kernel"])


def test_init_from_workdir_with_another_head_takes_the_backbone_only(tmp_path, caplog):
  import tools_fixtures
  source = tools_fixtures.make_workdir(tmp_path / "src", head="baseline", num_classes=6)
  saved = checkpointing.load_variables(source).variables
  config = _config()  # MUSP from a baseline run (the pretraining case)
  fresh = _variables(config, 4, seed=3)
  with caplog.at_level("INFO"):
    merged = checkpointing.initial_variables(fresh, source, model_config=config.model)
  for col in ("params", "batch_stats"):
    for path, value in _leaves(merged[col], "backbone/").items():
      np.testing.assert_array_equal(value, _leaves(saved[col], "backbone/")[path])
    for path, value in _leaves(merged[col], "head/").items():
      np.testing.assert_array_equal(value, _leaves(fresh[col], "head/")[path])
  assert "head starts fresh (the checkpoint's head is a baseline head" in caplog.text


def test_init_from_workdir_that_does_not_fit_is_a_named_error(tmp_path):
  import tools_fixtures
  source = tools_fixtures.make_workdir(tmp_path / "src", num_prototypes=3)
  deeper = _config(depth=34)
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match=r"does not fit the model as initial weights \(model.depth: "
                           r"checkpoint has 18, config asks 34\)"):
    checkpointing.initial_variables(_variables(deeper, 6, 0), source,
                                    model_config=deeper.model)
  more = _config(num_prototypes=5)  # the same head kind, other shapes
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match=r"(?s)model.num_prototypes: checkpoint has 3, config asks 5\).*"
                           r"shape of params/head/attention_conv/kernel: checkpoint "
                           r"\(3, 3, 512, 3\), model \(3, 3, 512, 5\)"):
    checkpointing.initial_variables(_variables(more, 6, 0), source,
                                    model_config=more.model)


def test_train_state_starts_from_a_workdir(tmp_path):
  import tools_fixtures
  from musp_jax.core import optim
  from musp_jax.core import state as state_lib
  from musp_jax.models import build_model
  from musp_jax.runtime import process
  source = tools_fixtures.make_workdir(tmp_path / "src", num_classes=6, seed=4)
  saved = checkpointing.load_variables(source).variables
  config = _config()
  config.model.init_from = str(source)
  model = build_model(config.model, 5)
  tx = optim.make_optimizer(config.optim, 1)
  state, _ = state_lib.create_train_state(
      model, tx, tuple(config.input.image_size), seed=0, mesh=process.make_mesh(),
      init_variables=checkpointing.init_function(config.model))
  np.testing.assert_array_equal(state.params["head"]["attention_conv"]["kernel"],
                                saved["params"]["head"]["attention_conv"]["kernel"])
  assert state.params["head"]["global_branch"]["classifier"]["kernel"].shape[-1] == 5
