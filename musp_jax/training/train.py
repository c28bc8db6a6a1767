"""Training and evaluation driver, read top to bottom in stages.

config check and workdir lock -> mesh -> data -> model and optimizer -> restore ->
loop (step, log, evaluate, checkpoint). The step itself is the pure `step.train_step`,
compiled by `step.jit_step`; the state lives in musp_jax/core/state.py; evaluation and the
results files in musp_jax/training/evaluator.py.

Stopping: the first SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption) lets the
current step finish, saves it, waits for the save and raises TrainingInterrupted,
which names the step to resume from; a second one ends the process at once (the
save in flight, if any, is abandoned and cleaned up by the next run). Any other
exception leaving the loop first waits for the saves in flight, so a checkpoint it
names is complete.

A non-finite loss stops the run (`_FiniteLossGuard`) and moves the checkpoint whose
weights gave it to <workdir>/diverged_checkpoints/; a resumed run keeps the step it
resumed from until a newer step's weights have given finite losses for a whole
checkpoint interval. So a run that diverges (a learning rate too high for the
resumed weights, say) never leaves its workdir without the step it started from,
and the same command resumes from a step whose loss was finite.
"""

from __future__ import annotations

import contextlib
import math
import signal
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers
from clu import periodic_actions
from etils import epath
from jax.sharding import NamedSharding

from musp_jax.training import checkpointing
from musp_jax.data import training_set
from musp_jax.training import evaluator
from musp_jax.training import model_pictures
from musp_jax.data import input_pipeline
from musp_jax.core import optim
from musp_jax.runtime import writing
from musp_jax.runtime import cli
from musp_jax.runtime import process
from musp_jax.core import state as state_lib
from musp_jax.core import step as step_lib
from musp_jax.training import validate
from musp_jax.models import build_model


class NonFiniteLossError(FloatingPointError):
  pass


class TrainingInterrupted(cli.Stopped):
  """SIGINT/SIGTERM stopped training after a finished, saved step."""

  def __init__(self, signum: int, step: int, directory: str):
    self.signum = signum
    super().__init__(
        f"Stopped by {signal.Signals(signum).name} after step {step}: checkpoint {step} "
        f"is saved in {directory}. Run the same command again to resume from it.",
        exit_code=128 + signum)


class _FiniteLossGuard:
  """Checks every step's loss, one step late so the device is never waited on.

  `push` checks the previous step's loss and keeps this one in flight; `flush`
  checks the one in flight (before a save, and at the end). The loss of step `i` is
  that of checkpoint `i`'s weights. A saved step is trusted once the losses of its
  weights and of the `trust_steps - 1` steps after it were finite; then the steps in
  `protected` (the one the run resumed from) are released to the manager's policy.
  A non-finite loss moves the saved steps from the one that gave it on to
  diverged_checkpoints/ and raises NonFiniteLossError naming the last good step.
  """

  def __init__(self, manager, *, protected: checkpointing.ProtectedSteps | None = None,
               trust_steps: int = 1):
    self.manager = manager
    self.protected = protected
    self.trust_steps = trust_steps
    self.pending = None
    self.untrusted: list[int] = []  # saved steps not yet trusted

  def saved(self, step: int) -> None:
    """Records that checkpoint `step` was saved (its weights are not checked yet)."""
    self.untrusted.append(step)

  def push(self, step: int, metrics: dict) -> None:
    self.flush()
    self.pending = (step, metrics)

  def flush(self) -> None:
    if self.pending is None:
      return
    (step, metrics), self.pending = self.pending, None
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
      raise NonFiniteLossError(
          f"Loss became {loss} at step {step + 1}; training stopped ("
          f"{self._last_good(step)}). Lower optim.lr, enable optim.grad_clip, or "
          "check the input data.")
    trusted = [s for s in self.untrusted if s + self.trust_steps - 1 <= step]
    if trusted:
      self.untrusted = [s for s in self.untrusted if s not in trusted]
      if self.protected is not None:
        self.protected.steps.clear()  # all older than the trusted step

  def _last_good(self, step: int) -> str:
    """The newest finished checkpoint whose weights gave a finite loss; checkpoints
    from `step` on (step's weights gave the non-finite loss) are set aside.

    Saves still in flight are waited for.
    """
    self.manager.wait_until_finished()
    saved = checkpointing.finished_steps(self.manager.directory)
    good = [s for s in saved if s < step]
    where = (f"the last good checkpoint is step {good[-1]} in {self.manager.directory}"
             if good else "no good checkpoint was saved")
    bad = [s for s in saved if s >= step]
    for s in bad:
      target = checkpointing.set_aside(self.manager, s, checkpointing.DIVERGED_FOLDER)
      where += (f"; checkpoint {s}, whose weights gave this loss, is moved to {target}"
                if s == step else f"; checkpoint {s}, saved after it, is moved to {target}")
    if bad:
      self.manager.reload()
    return where


def _mean_scalars(history: list[dict]) -> dict[str, float]:
  """Averages logged metrics over steps; per-branch vectors become name/i scalars."""
  stacked = jax.device_get(jax.tree.map(lambda *x: jnp.stack(x), *history))
  out = {}
  for name, value in stacked.items():
    value = np.asarray(value, np.float64).mean(axis=0)
    if value.ndim == 0:
      out[name] = float(value)
    else:
      out.update({f"{name}/{i}": float(v) for i, v in enumerate(value.reshape(-1))})
  return out


def _schedule(config, num_images: int) -> tuple[int, int, int]:
  """(global batch, steps per epoch, total steps) of the recipe."""
  global_batch = config.input.num_ids * config.input.num_instances
  steps_per_epoch = input_pipeline.steps_per_epoch(num_images, global_batch)
  return global_batch, steps_per_epoch, config.optim.num_epochs * steps_per_epoch


def _lock(workdir: epath.Path) -> contextlib.AbstractContextManager:
  """The workdir's lock (one per process of a multi-host run); none on object stores."""
  if "://" in str(workdir):
    logging.warning("%s is not a local folder: it is not locked against a second run.",
                    workdir)
    return contextlib.nullcontext()
  name = writing.LOCK_NAME
  if jax.process_count() > 1:
    name += f".{jax.process_index()}"
  return writing.WorkdirLock(workdir, name)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains with the config's recipe, evaluating periodically; resumes from workdir.

  Returns the latest results (those of results.json). Raises ConfigError before
  anything runs if a field is unusable, WorkdirLockedError if another run trains in
  workdir, TrainingInterrupted after a signal.
  """
  workdir = epath.Path(workdir).expanduser()
  process.configure_jax(config)
  validate.check_config(config, mode="train")
  workdir.mkdir(parents=True, exist_ok=True)
  with _lock(workdir):
    return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: epath.Path) -> dict:
  # Mesh.
  mesh = process.make_mesh()

  # Data.
  data = training_set.load(config)
  validate.check_identities(config, data.identities())
  global_batch, steps_per_epoch, total_steps = _schedule(config, len(data.source))
  eval_every = max(1, config.eval.every_epochs * steps_per_epoch)
  logging.info("%d training images, %d ids; %d steps/epoch, %d steps.",
               len(data.source), data.num_classes, steps_per_epoch, total_steps)

  # Model and optimizer.
  model = build_model(config.model, data.num_classes)
  tx = optim.make_optimizer(config.optim, steps_per_epoch)
  state, state_sharding = state_lib.create_train_state(
      model, tx, config.input.image_size, seed=config.seed, mesh=mesh,
      init_variables=checkpointing.init_function(config.model))

  # The step a run resumes from is kept until a newer one is trusted (_FiniteLossGuard).
  protected = checkpointing.ProtectedSteps()
  manager = checkpointing.make_manager(workdir / "checkpoints", keep=config.keep_checkpoints,
                                       protected=protected)
  state, start_step = _resume(manager, state, config, model, tx, state_sharding,
                              total_steps=total_steps, steps_per_epoch=steps_per_epoch)
  if start_step > 0:
    protected.steps.add(manager.latest_step())
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  run = checkpointing.RunInfo(config, data.num_classes, data.label_identities)
  results: dict = evaluator.read_results(workdir)
  if start_step >= total_steps:
    logging.info("Training in %s is complete (step %d of %d): nothing to train. "
                 "Evaluate it with --mode=eval.", workdir, start_step, total_steps)
    return results

  # Loop.
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  batches = input_pipeline.train_batches(
      data.source, data.labels, config.input, seed=config.seed, start_step=start_step,
      global_batch_size=global_batch, process_index=jax.process_index(),
      process_count=jax.process_count(), domains=data.domains)
  train_step = step_lib.jit_step(model=model, tx=tx, loss_config=config.loss,
                                 input_config=config.input, mesh=mesh,
                                 state_sharding=state_sharding)
  batch_sharding = NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer)
  guard = _FiniteLossGuard(manager, protected=protected,
                           trust_steps=config.checkpoint_every_steps)
  history: list[dict] = []
  try:
    with process.StopRequests() as stop:
      for step in range(start_step, total_steps):
        state, metrics = train_step(state, input_pipeline.device_put_batch(
            next(batches), batch_sharding))
        guard.push(step, metrics)
        history.append(metrics)
        report(done := step + 1)
        if done % config.log_every_steps == 0 or done == total_steps:
          writer.write_scalars(done, {f"train/{k}": v
                                      for k, v in _mean_scalars(history).items()})
          history = []
        at_eval = done % eval_every == 0 or done == total_steps
        if at_eval or done % config.checkpoint_every_steps == 0 or stop.signum is not None:
          guard.flush()  # never save weights that gave a non-finite loss
          tracked = None
          if at_eval:
            results = _evaluate(model, state, config, mesh, writer, done, steps_per_epoch,
                                workdir)
            tracked = {checkpointing.METRIC: evaluator.primary_map(results["results"])}
          checkpointing.save(manager, done, state, next_step=done, run=run, metrics=tracked)
          guard.saved(done)
        if stop.signum is not None and done < total_steps:
          manager.wait_until_finished()
          raise TrainingInterrupted(stop.signum, done, str(manager.directory))
      guard.flush()
  except BaseException:
    # Saves in flight finish before the error is reported, so what it names exists.
    with contextlib.suppress(Exception):
      manager.wait_until_finished()
    raise
  finally:
    batches.close()  # stops grain's worker processes and frees their shared memory
  manager.wait_until_finished()
  writer.flush()
  checkpointing.log_saved(manager)
  return results


def _resume(manager, state, config, model, tx, state_sharding, *, total_steps: int,
            steps_per_epoch: int) -> tuple[Any, int]:
  """(state, first step to run): the newest intact checkpoint of the workdir, data
  position included, or the fresh `state` at step 0."""
  if manager.latest_step() is None:
    return state, 0
  state, restored_step, next_step = checkpointing.restore(
      manager, state_lib.abstract_train_state(
          model, tx, config.input.image_size, state_sharding),
      model_config=config.model, set_aside_corrupt=True)
  validate.check_resume(restored_step, total_steps=total_steps,
                        steps_per_epoch=steps_per_epoch, config=config,
                        where=str(manager.directory))
  logging.info("Resumed from step %d in %s.", restored_step, manager.directory)
  return state, next_step


def _evaluate(model, state, config, mesh, writer, step: int, steps_per_epoch: int,
              workdir: epath.Path) -> dict:
  """Evaluates, logs scalars and the attention grid, writes the results files."""
  rows = evaluator.evaluate_model(model, state.variables, config, mesh)
  results = {"step": step, "epoch": step / steps_per_epoch, "results": rows}
  writer.write_scalars(step, evaluator.tensorboard_scalars(rows))
  if config.model.head == "musp" and jax.process_index() == 0:
    grid = model_pictures.eval_attention_grid(model, state.variables, config)
    writer.write_images(step, {"attention": grid[None]})
  evaluator.write_results(workdir, results)
  return results


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, *,
                        step: int | None = None) -> dict:
  """Evaluates a saved step (default: latest) of workdir, or config.model.init_from.

  The model is the checkpoint's own (its saved config and class count); config must
  agree on the architecture and gives the evaluation settings and dataset, so another
  dataset than the training one (cross-domain) needs only itself built. The results
  go to <workdir>/eval_step_<step>.json and .md; if workdir cannot be written (checked
  before anything is computed) they are only returned, under "not_written" the reason.
  """
  workdir = epath.Path(workdir).expanduser()
  process.configure_jax(config)
  validate.check_config(config, mode="eval")
  unwritable = None
  if jax.process_index() == 0 and "://" not in str(workdir) and workdir.is_dir():
    unwritable = writing.check_writable(workdir)
    if unwritable:
      logging.warning("Cannot write the results to %s (%s): they will only be printed.",
                      workdir, unwritable)
  mesh = process.make_mesh()
  replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())
  # The weights: workdir's own, or model.init_from's when workdir has none yet.
  source = (workdir if (workdir / "checkpoints").is_dir() or not config.model.init_from
            else config.model.init_from)
  restored = checkpointing.load_variables(source, step=step, sharding=replicated)
  checkpointing.check_model_config(restored.run.config.model, config.model,
                                   where=restored.source)
  # Imported backbone weights have no classifier; features do not depend on its size.
  model = build_model(config.model, max(restored.run.num_classes, 1))
  variables, _ = checkpointing.merge_init(
      state_lib.init_variables(model, config.input.image_size, config.seed),
      restored.variables, where=restored.source)
  variables, done = jax.device_put(variables, replicated), restored.step
  rows = evaluator.evaluate_model(model, variables, config, mesh)
  results = {"step": done, "results": rows}
  if unwritable:
    return {**results, "not_written": f"{workdir} is not writable ({unwritable})"}
  evaluator.write_results(workdir, results, name=f"eval_step_{done}")
  return results
