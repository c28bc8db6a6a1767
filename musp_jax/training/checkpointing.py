"""Orbax checkpoints: train state, data position and what the run was, in one step.

Each saved step holds three items:
  state   the TrainState (params, batch_stats, optimizer state, step),
  data    {"next_step": ...}: the PK sampler is a pure function of (seed, step), so the
          step at which to rebuild the input pipeline is the whole data position,
  run     the run's description (`RunInfo`): the resolved config, the class count and
          the dataset and vehicle id of each training label. A step folder alone rebuilds its
          model: evaluation on another dataset, the tools and the demo need neither the
          training data nor the workdir's config.json.
The latest `keep` steps are kept, and the best step by mAP is kept as well.

`load_variables` is the one way to get a model's weights out of a checkpoint: it
restores params and batch_stats only (no optimizer state).

A step whose files are missing or unreadable (a truncated array file, a deleted
`_METADATA`, a lost item) is corrupt, which is not the same as a step of another
architecture: restoring the latest step falls back to the newest intact one, naming the
corrupt step and why, and training moves the corrupt step aside (to
<workdir>/corrupt_checkpoints/) so that it can save that step again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from musp_jax import models
from musp_jax.core.state import path_str

METRIC = "mAP"


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the model the config describes."""


class CheckpointCorruptError(ValueError):
  """A saved step's files are missing or unreadable."""


# Errors of reading a step's files (tensorstore reports a truncated file as a
# ValueError, a missing item is a KeyError); anything else, e.g. running out of device
# memory, is not the step's fault and is raised as it is.
_READ_ERRORS = (ValueError, OSError, KeyError)
CORRUPT_FOLDER = "corrupt_checkpoints"  # next to checkpoints/


@dataclasses.dataclass(frozen=True)
class RunInfo:
  """What a checkpoint was trained as; saved with every step."""
  config: ml_collections.ConfigDict  # the resolved run config
  num_classes: int
  # (dataset, vehicle id) of each label 0..K-1 (musp_jax/data/training_set.py)
  label_identities: tuple[tuple[str, int], ...] = ()

  def to_json(self) -> dict:
    return {"config": jsonable(self.config), "num_classes": int(self.num_classes),
            "label_identities": [[str(d), int(v)] for d, v in self.label_identities]}

  @classmethod
  def from_json(cls, data: dict) -> RunInfo:
    config = ml_collections.ConfigDict(data["config"])
    if "label_identities" in data:
      identities = tuple((str(d), int(v)) for d, v in data["label_identities"])
    else:  # written before several training datasets: one dataset's vehicle ids
      identities = tuple((config.dataset.name, int(v))
                         for v in data.get("label_vehicle_ids", ()))
    return cls(config=config, num_classes=int(data["num_classes"]),
               label_identities=identities)


@dataclasses.dataclass(frozen=True)
class Restored:
  """Weights restored by `load_variables`, and what they are."""
  variables: dict  # {"params", "batch_stats"}
  run: RunInfo
  step: int
  source: str  # the step folder, <workdir>/checkpoints/<step>


def make_manager(directory: str | epath.Path, *, keep: int = 2,
                 read_only: bool = False) -> ocp.CheckpointManager:
  """A manager that keeps the `keep` latest steps and the best step by mAP."""
  policy = pp.AnyPreservationPolicy([
      pp.LatestN(n=keep),
      pp.BestN(get_metric_fn=lambda m: m[METRIC], reverse=False, n=1,
               keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy,
      best_fn=lambda m: m[METRIC],
      best_mode="max",
      cleanup_tmp_directories=not read_only,
      read_only=read_only,
      create=not read_only,
  )
  return _manager(directory, options, ocp.StandardCheckpointHandler())


def _manager(directory, options, state_handler) -> ocp.CheckpointManager:
  # Handlers named up front, so a freshly opened manager can read metadata before
  # any save (restore checks shapes against it).
  # Orbax's array store wants absolute paths; users pass relative workdirs.
  return ocp.CheckpointManager(
      epath.Path(os.path.abspath(os.path.expanduser(directory))), options=options,
      item_handlers={"state": state_handler,
                     "data": ocp.JsonCheckpointHandler(),
                     "run": ocp.JsonCheckpointHandler()})


def save(manager: ocp.CheckpointManager, step: int, state: Any, *,
         next_step: int, run: RunInfo, metrics: dict | None = None) -> None:
  """Saves asynchronously; `manager.wait_until_finished()` before exiting."""
  manager.save(
      step,
      args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=ocp.args.JsonSave({"next_step": int(next_step)}),
          run=ocp.args.JsonSave(run.to_json()),
      ),
      metrics=None if metrics is None else {k: float(v) for k, v in metrics.items()},
      force=True,
  )


def resolve_step(manager: ocp.CheckpointManager, step: int | None) -> int:
  """`step` if saved (default: the latest), else FileNotFoundError listing saved steps."""
  if step is None:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {manager.directory}; train first.")
  if step not in manager.all_steps():
    raise FileNotFoundError(
        f"No checkpoint for step {step} in {manager.directory}; saved steps: "
        f"{sorted(manager.all_steps())}.")
  return step


def saved_model_config(manager: ocp.CheckpointManager, step: int) -> dict:
  """The model config a step was written with (its `run` item)."""
  run = manager.restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore()))["run"]
  return run["config"]["model"]


def restore(manager: ocp.CheckpointManager, abstract_state: Any, *,
            model_config: Any, step: int | None = None,
            set_aside_corrupt: bool = False) -> tuple[Any, int, int]:
  """Restores the whole train state of `step` (default: latest), for resuming.

  Returns (state, step, next data step). Raises CheckpointMismatchError naming the
  differing model fields or arrays. Without `step`, a corrupt latest step is logged
  and skipped for the newest intact one (and, with `set_aside_corrupt`, moved to
  <checkpoints>/../corrupt_checkpoints/); an explicit corrupt `step` is an error.
  """
  if step is not None:
    step = resolve_step(manager, step)
    return _restore_step(manager, step, abstract_state, model_config)
  resolve_step(manager, None)  # no checkpoint at all: FileNotFoundError
  corrupt = []
  for candidate in sorted(manager.all_steps(), reverse=True):
    try:
      restored = _restore_step(manager, candidate, abstract_state, model_config)
    except CheckpointCorruptError as e:
      corrupt.append(candidate)
      moved = f"; moved it to {_set_aside(manager, candidate)}" if set_aside_corrupt else ""
      logging.warning("%s%s. Falling back to the step before it.", e, moved)
      continue
    if set_aside_corrupt and corrupt:
      manager.reload()
    return restored
  raise CheckpointCorruptError(
      f"Every checkpoint in {manager.directory} is corrupt (steps {sorted(corrupt)}; "
      "the reasons are logged above); train in a new --workdir.")


def _restore_step(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
                  model_config: Any) -> tuple[Any, int, int]:
  where = f"{manager.directory}/{step}"
  _check_intact(manager.directory / str(step), ("state", "data"))
  with _reading(step, where):
    saved = saved_model_config(manager, step)
  check_model_config(saved, model_config, where=where)
  with _reading(step, where):
    metadata = manager.item_metadata(step)["state"]
  check_tree(metadata, abstract_state, where=where)
  with _reading(step, where):
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore(),
    ))
    return restored["state"], step, int(restored["data"]["next_step"])


def _check_intact(step_dir: epath.Path, items: tuple[str, ...]) -> None:
  """Raises CheckpointCorruptError naming the first missing file of a step folder.

  `items` must be present, and `run` with them.
  """
  missing = None
  if not (step_dir / "run").exists():
    missing = "run/ (what the model is)"
  for item in items:
    if missing is None and not (step_dir / item).is_dir():
      missing = f"{item}/"
  if missing is None and "state" in items and not (step_dir / "state/_METADATA").exists():
    missing = "state/_METADATA (the array tree)"
  if missing:
    raise CheckpointCorruptError(f"Checkpoint step {step_dir.name} in {step_dir.parent} "
                                 f"is corrupt: {missing} is missing")


@contextlib.contextmanager
def _reading(step: int, where: str) -> Iterator[None]:
  """Turns a failure to read a step's files into CheckpointCorruptError."""
  try:
    yield
  except CheckpointMismatchError:
    raise
  except _READ_ERRORS as e:
    text = str(e).split(" [tensorstore_spec=")[0].strip().strip("'\"")
    text = text.splitlines()[0] if text else type(e).__name__
    raise CheckpointCorruptError(
        f"Checkpoint step {step} in {os.path.dirname(where)} is corrupt: "
        f"{text[:1000]}") from e


def _set_aside(manager: ocp.CheckpointManager, step: int) -> str:
  """Moves a corrupt step out of the manager's folder (kept for inspection)."""
  target = epath.Path(manager.directory).parent / CORRUPT_FOLDER / str(step)
  if jax.process_index() == 0:
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = 1
    while target.exists():
      target = target.parent / f"{step}.{suffix}"
      suffix += 1
    (epath.Path(manager.directory) / str(step)).rename(target)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"set_aside_{step}")
  return str(target)


def finished_steps(directory: str | os.PathLike) -> list[int]:
  """The steps whose saves are complete on disk (in-flight ones excluded), sorted."""
  return sorted(ocp.utils.checkpoint_steps(epath.Path(directory)))


def check_model_config(saved: Any, wanted: Any, *, where: str) -> None:
  """Raises CheckpointMismatchError naming every architecture field that differs."""
  a, b = models.architecture(saved), models.architecture(wanted)
  diffs = [f"model.{k}: checkpoint has {a[k]!r}, config asks {b[k]!r}"
           for k in models.ARCH_FIELDS if a[k] != b[k]]
  if diffs:
    raise CheckpointMismatchError(
        f"Checkpoint {where} was written for another architecture: " + "; ".join(diffs)
        + ".")


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  return {path_str(k): tuple(getattr(v, "shape", None) or np.shape(v) or ())
          for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def check_tree(saved_metadata: Any, abstract: Any, *, where: str) -> None:
  """Compares array shapes by path; names every missing, extra or mis-shaped array."""
  saved, wanted = _shapes(saved_metadata), _shapes(abstract)
  problems = [f"missing in checkpoint: {k} {wanted[k]}"
              for k in sorted(wanted.keys() - saved.keys())]
  problems += [f"not in model: {k} {saved[k]}" for k in sorted(saved.keys() - wanted.keys())]
  problems += [f"shape of {k}: checkpoint {saved[k]}, model {wanted[k]}"
               for k in sorted(wanted.keys() & saved.keys()) if saved[k] != wanted[k]]
  if problems:
    shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
    raise CheckpointMismatchError(
        f"Checkpoint {where} does not fit the model:\n  " + "\n  ".join(shown))


# --------------------------------------------------------------------------
# Loading weights for evaluation and the tools.


def locate(path: str | os.PathLike, step: int | None = None) -> tuple[epath.Path, int | None]:
  """(checkpoints folder, step) from a workdir, a checkpoints folder or a step folder.

  A step folder <...>/checkpoints/<step> fixes the step; `step` must then agree.
  """
  path = epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
  if (path / "checkpoints").is_dir():
    return path / "checkpoints", step
  if path.is_dir() and path.name.isdigit() and (path / "state").is_dir():
    if step is not None and step != int(path.name):
      raise ValueError(f"{path} is the folder of step {path.name}, but step {step} "
                       "was asked for.")
    return path.parent, int(path.name)
  if path.is_dir() and any(p.name.isdigit() for p in path.iterdir()):
    return path, step
  raise FileNotFoundError(
      f"{path} holds no checkpoint: expected a training workdir (with checkpoints/), its "
      "checkpoints/ folder, or a step folder checkpoints/<step>.")


def load_variables(path: str | os.PathLike, *, step: int | None = None,
                   sharding: jax.sharding.Sharding | None = None) -> Restored:
  """Restores the model weights of a saved step (default: latest), nothing else.

  params and batch_stats are restored by a partial Orbax restore: no optimizer state
  is read, and no dataset is needed. `sharding` (default: the first local device) is
  where the arrays are placed, e.g. replicated over a mesh. Without `step`, a corrupt
  latest step is logged and the newest intact one is used.
  """
  directory, step = locate(path, step)
  options = ocp.CheckpointManagerOptions(read_only=True, create=False)
  # The PyTree handler reads the same files as the Standard one and can restore a
  # subtree (partial_restore).
  manager = _manager(directory, options, ocp.PyTreeCheckpointHandler())
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  if step is not None:
    return _load_step(manager, resolve_step(manager, step), sharding)
  resolve_step(manager, None)  # no checkpoint at all: FileNotFoundError
  corrupt = []
  for candidate in sorted(manager.all_steps(), reverse=True):
    try:
      return _load_step(manager, candidate, sharding)
    except CheckpointCorruptError as e:
      corrupt.append(candidate)
      logging.warning("%s. Using the step before it.", e)
  raise CheckpointCorruptError(
      f"Every checkpoint in {directory} is corrupt (steps {sorted(corrupt)}; the "
      "reasons are logged above).")


def _load_step(manager: ocp.CheckpointManager, step: int,
               sharding: jax.sharding.Sharding) -> Restored:
  where = manager.directory / str(step)
  _check_intact(where, ("state",))
  run = _run_info(manager, step, where)
  with _reading(step, str(where)):
    saved = manager.item_metadata(step)["state"]
    saved = getattr(saved, "tree", saved)
    target = {col: jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding),
        saved.get(col, {})) for col in ("params", "batch_stats")}
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)))["state"]
  return Restored(variables={"params": restored["params"],
                             "batch_stats": restored.get("batch_stats", {})},
                  run=run, step=int(step), source=str(where))


def _run_info(manager: ocp.CheckpointManager, step: int, where: epath.Path) -> RunInfo:
  with _reading(step, str(where)):
    return RunInfo.from_json(manager.restore(
        step, args=ocp.args.Composite(run=ocp.args.JsonRestore()))["run"])


def jsonable(config: Any) -> dict:
  """ConfigDict / dict -> plain JSON types (tuples become lists)."""
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  return json.loads(json.dumps(config, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def log_saved(manager: ocp.CheckpointManager) -> None:
  logging.info("Checkpoints in %s: %s (best: %s)", manager.directory,
               manager.all_steps(), manager.best_step())
