"""Training and evaluation driver, read top to bottom in stages.

mesh -> data -> model and optimizer -> restore -> loop (step, log, evaluate, checkpoint).
The step itself is a pure function `train_step(state, batch, *, model, tx, loss_config)`.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers
from clu import periodic_actions
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from musp_jax import checkpointing
from musp_jax import datasets
from musp_jax import distributed
from musp_jax import evaluator
from musp_jax import input_pipeline
from musp_jax import losses
from musp_jax import optim
from musp_jax.models import build_model
from musp_jax.models import weights


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any

  @property
  def variables(self) -> dict:
    return {"params": self.params, "batch_stats": self.batch_stats}


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


def make_mesh() -> jax.sharding.Mesh:
  """A 1-D data-parallel mesh over every device of every process."""
  return jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))


def _init_state(model, tx, image_size, seed: int, variables=None) -> TrainState:
  if variables is None:
    dummy = jnp.zeros((1, *image_size, 3), jnp.float32)
    variables = model.init(jax.random.key(seed), dummy, train=False)
  return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                    batch_stats=variables.get("batch_stats", {}),
                    opt_state=tx.init(variables["params"]))


def abstract_train_state(model, tx, image_size, sharding) -> TrainState:
  """Shapes, dtypes and shardings of the state, without computing it (for restore)."""
  shapes = jax.eval_shape(functools.partial(_init_state, model, tx, image_size, 0))
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)


def create_train_state(model, tx, image_size, *, seed: int, mesh, init_from: str = ""):
  """Initialises (or imports) the state directly into replicated device memory."""
  replicated = NamedSharding(mesh, P())
  init = functools.partial(_init_state, model, tx, image_size, seed)
  if not init_from:
    return jax.jit(init, out_shardings=replicated)(), replicated
  variables = jax.jit(lambda: init().variables, out_shardings=replicated)()
  variables = jax.device_put(weights.load_init(variables, init_from), replicated)
  return jax.jit(lambda v: init(v), out_shardings=replicated)(variables), replicated


class NonFiniteLossError(FloatingPointError):
  pass


def _check_finite(step: int, metrics: dict, manager) -> None:
  loss = float(metrics["loss"])
  if not math.isfinite(loss):
    last = manager.latest_step()
    where = (f"the last good checkpoint is step {last} in {manager.directory}"
             if last is not None else "no checkpoint was saved yet")
    raise NonFiniteLossError(
        f"Loss became {loss} at step {step + 1}; training stopped ({where}). "
        "Lower optim.lr, enable optim.grad_clip, or check the input data.")


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


class _QuietLibraries:
  """Drops the INFO chatter of Orbax, grain and tfds (every save logs dozens of lines)."""

  def filter(self, record) -> bool:
    noisy = ("/orbax/", "/grain/", "/tensorflow_datasets/")
    if not any(p in record.pathname for p in noisy):
      return True
    # Saves between evaluations carry no mAP by design; Orbax warns about each one.
    return record.levelno > 20 and "tracked_metric" not in record.getMessage()


def quiet_library_logs() -> None:
  """For command-line entry points: keep the console to this project's progress."""
  logging.get_absl_handler().addFilter(_QuietLibraries())


def _setup_jax(config) -> None:
  """Process-wide JAX settings from the config: multi-host start-up, compile cache."""
  if config.compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir",
                      str(epath.Path(config.compilation_cache_dir).expanduser()))
  if config.distributed and not jax.distributed.is_initialized():
    distributed.initialize()


def _data(config):
  """Builds (synthetic) or finds the training split, its labels and class count."""
  ds = config.dataset
  kw = dict(data_dir=ds.data_dir, builder_config=ds.builder_config)
  datasets.ensure_built(ds.name, manual_dir=ds.manual_dir, **kw)
  source = datasets.load_split(ds.name, "train", **kw)
  labels = datasets.split_index(ds.name, "train", **kw)["label"]
  return source, labels, datasets.num_classes(ds.name, **kw)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains with the config's recipe, evaluating periodically; resumes from workdir."""
  workdir = epath.Path(workdir).expanduser()
  workdir.mkdir(parents=True, exist_ok=True)
  _setup_jax(config)
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

  # Mesh.
  mesh = make_mesh()
  batch_sharding = NamedSharding(mesh, P("data"))

  # Data.
  train_source, train_labels, num_classes = _data(config)
  global_batch = config.input.num_ids * config.input.num_instances
  if global_batch % jax.device_count():
    raise ValueError(
        f"input.num_ids * input.num_instances = {global_batch} must be divisible by "
        f"the {jax.device_count()} devices.")
  steps_per_epoch = input_pipeline.steps_per_epoch(len(train_source), global_batch)
  total_steps = config.optim.num_epochs * steps_per_epoch
  eval_every = max(1, config.eval.every_epochs * steps_per_epoch)
  logging.info("%d training images, %d ids; %d steps/epoch, %d steps.",
               len(train_source), num_classes, steps_per_epoch, total_steps)

  # Model and optimizer.
  model = build_model(config.model, num_classes)
  tx = optim.make_optimizer(config.optim, steps_per_epoch)
  state, state_sharding = create_train_state(
      model, tx, config.input.image_size, seed=config.seed, mesh=mesh,
      init_from=config.model.init_from)

  # Restore: the latest checkpoint of this workdir, data position included.
  manager = checkpointing.make_manager(workdir / "checkpoints", keep=config.keep_checkpoints)
  start_step = 0
  if manager.latest_step() is not None:
    state, restored_step, start_step = checkpointing.restore(
        manager, abstract_train_state(model, tx, config.input.image_size, state_sharding),
        model_config=config.model)
    logging.info("Resumed from step %d in %s.", restored_step, manager.directory)

  # Loop.
  batches = input_pipeline.train_batches(
      train_source, train_labels, config.input, seed=config.seed, start_step=start_step,
      global_batch_size=global_batch, process_index=jax.process_index(),
      process_count=jax.process_count())
  step_fn = jax.jit(
      functools.partial(train_step, model=model, tx=tx, loss_config=config.loss),
      in_shardings=(state_sharding, batch_sharding),
      out_shardings=(state_sharding, NamedSharding(mesh, P())),
      donate_argnums=0)
  report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer)
  history: list[dict] = []
  results: dict = _read_results(workdir)
  previous = None
  for step in range(start_step, total_steps):
    batch = input_pipeline.device_put_batch(next(batches), batch_sharding)
    state, metrics = step_fn(state, batch)
    # Checking the previous step's loss keeps one step in flight and names the exact step.
    if previous is not None:
      _check_finite(*previous, manager)
    previous = (step, metrics)
    history.append(metrics)
    report(step + 1)
    done = step + 1
    if done % config.log_every_steps == 0 or done == total_steps:
      writer.write_scalars(done, {f"train/{k}": v for k, v in _mean_scalars(history).items()})
      history = []
    if done % eval_every == 0 or done == total_steps:
      _check_finite(step, metrics, manager)
      rows = evaluator.evaluate(model, state.variables, config, mesh)
      results = {"step": done, "epoch": done / steps_per_epoch, "results": rows}
      writer.write_scalars(done, evaluator.flat_scalars(rows))
      checkpointing.save(manager, done, state, next_step=done, model_config=config.model,
                         metrics={checkpointing.METRIC: evaluator.primary_map(rows)})
      _write_results(workdir, results)
    elif done % config.checkpoint_every_steps == 0:
      _check_finite(step, metrics, manager)
      checkpointing.save(manager, done, state, next_step=done, model_config=config.model)
  if previous is not None:
    _check_finite(*previous, manager)
  batches.close()  # stops grain's worker processes and frees their shared memory
  manager.wait_until_finished()
  writer.flush()
  checkpointing.log_saved(manager)
  return results


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, *,
                        step: int | None = None) -> dict:
  """Restores a saved step (default: latest) of workdir and evaluates it."""
  workdir = epath.Path(workdir).expanduser()
  _setup_jax(config)
  manager = checkpointing.make_manager(workdir / "checkpoints", read_only=True)
  if manager.latest_step() is None and not config.model.init_from:
    raise FileNotFoundError(
        f"No checkpoint in {workdir / 'checkpoints'} and no --config.model.init_from; "
        "train first or name imported weights.")
  mesh = make_mesh()
  _, _, num_classes = _data(config)
  model = build_model(config.model, num_classes)
  tx = optim.make_optimizer(config.optim, 1)
  done = 0
  if manager.latest_step() is not None:
    abstract = abstract_train_state(model, tx, config.input.image_size,
                                    NamedSharding(mesh, P()))
    state, done, _ = checkpointing.restore(manager, abstract, model_config=config.model,
                                           step=step)
  else:
    state, _ = create_train_state(model, tx, config.input.image_size, seed=config.seed,
                                  mesh=mesh, init_from=config.model.init_from)
  rows = evaluator.evaluate(model, state.variables, config, mesh)
  results = {"step": done, "results": rows}
  _write_results(workdir, results, name=f"eval_step_{done}")
  return results


def _read_results(workdir: epath.Path) -> dict:
  path = workdir / "results.json"
  return json.loads(path.read_text()) if path.exists() else {}


def _write_results(workdir: epath.Path, results: dict, name: str = "results") -> None:
  """results.json plus a markdown table; written atomically so a kill never truncates."""
  if jax.process_index() > 0:
    return
  for suffix, text in ((".json", json.dumps(results, indent=2)),
                       (".md", evaluator.markdown_table(results))):
    tmp = workdir / f".{name}{suffix}.tmp"
    tmp.write_text(text)
    tmp.replace(workdir / f"{name}{suffix}")
