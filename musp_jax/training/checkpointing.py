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

A step whose files are missing or unreadable (a truncated array file, bad metadata, a
deleted `_METADATA`, a lost item) is corrupt, which is not the same as a step of another
architecture: restoring the latest step falls back to the newest intact one, naming the
corrupt step, the file and why in one line, and training moves the corrupt step aside
(to <workdir>/corrupt_checkpoints/) so that it can save that step again.

`ProtectedSteps` keeps named steps whatever the latest-N policy says: training keeps
the step it resumed from until a newer one has proved itself (train.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import logging
import os
import pathlib
import re
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
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


# Errors of reading a step's files: tensorstore reports a short or unreadable file as a
# ValueError (which Orbax may raise as the cause of a plain Exception), bad JSON
# metadata is a ValueError, a missing item a KeyError. A failure with none of these
# among its causes, e.g. running out of device memory, is not the step's fault and is
# raised as it is.
_READ_ERRORS = (ValueError, OSError, KeyError)
CORRUPT_FOLDER = "corrupt_checkpoints"  # next to checkpoints/
DIVERGED_FOLDER = "diverged_checkpoints"  # steps whose weights gave a non-finite loss


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


@dataclasses.dataclass
class ProtectedSteps(pp.PreservationPolicy):
  """Preserves the steps in `steps` (a set the owner changes as it goes)."""
  steps: set[int] = dataclasses.field(default_factory=set)

  def should_preserve(self, checkpoints: Sequence[Any], *,
                      context: pp.PreservationContext) -> Sequence[bool]:
    del context
    return [info.step in self.steps for info in checkpoints]


def make_manager(directory: str | epath.Path, *, keep: int = 2,
                 read_only: bool = False,
                 protected: ProtectedSteps | None = None) -> ocp.CheckpointManager:
  """A manager that keeps the `keep` latest steps, the best step by mAP and the
  `protected` steps."""
  policy = pp.AnyPreservationPolicy([
      pp.LatestN(n=keep),
      pp.BestN(get_metric_fn=lambda m: m[METRIC], reverse=False, n=1,
               keep_checkpoints_without_metrics=False),
      *([protected] if protected is not None else []),
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


# Key of the run config of weights converted by import_weights: where they came from.
IMPORTED = "imported"


def save_imported(workdir: str | os.PathLike, variables: Any, *, model: dict,
                  num_classes: int, source: dict) -> None:
  """Writes converted weights as step 0 of a workdir (<workdir>/checkpoints/0).

  It is the one weights format: `load_variables` reads it as it reads a training
  step, so model.init_from, evaluate, embed and export take either. The run config
  holds the model fields the weights fix (`model`) and, under IMPORTED, where they
  came from; `num_classes` is the classifier's size (0: backbone only).
  """
  manager = make_manager(epath.Path(os.path.abspath(os.fspath(workdir))) / "checkpoints",
                         keep=1)
  run = RunInfo(ml_collections.ConfigDict({"model": dict(model), IMPORTED: dict(source)}),
                int(num_classes))
  save(manager, 0, jax.tree.map(np.asarray, variables), next_step=0, run=run)
  manager.wait_until_finished()
  manager.close()


def imported_from(path: str | os.PathLike) -> dict | None:
  """What import_weights recorded in the folder `path`, or None when it did not
  write it (a training workdir, any other folder, nothing)."""
  try:
    directory, step = locate(path)
    manager = _manager(directory, ocp.CheckpointManagerOptions(read_only=True, create=False),
                       ocp.PyTreeCheckpointHandler())
    step = resolve_step(manager, step)
    source = _run_info(manager, step, directory / str(step)).config.get(IMPORTED)
  except Exception:  # unreadable or not a checkpoint: not an import
    return None
  return source.to_dict() if source is not None else None


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
  return _newest_intact(
      manager, lambda s: _restore_step(manager, s, abstract_state, model_config),
      set_aside_corrupt=set_aside_corrupt)


def _newest_intact(manager: ocp.CheckpointManager, read_step: Callable[[int], Any], *,
                   set_aside_corrupt: bool) -> Any:
  """read_step(step) of the newest step that is not corrupt, from the latest down.

  Each corrupt step is logged in one line (and, with `set_aside_corrupt`, moved to
  <checkpoints>/../corrupt_checkpoints/). No step at all: FileNotFoundError.
  """
  resolve_step(manager, None)
  corrupt = []
  for candidate in sorted(manager.all_steps(), reverse=True):
    try:
      result = read_step(candidate)
    except CheckpointCorruptError as e:
      corrupt.append(candidate)
      moved = f"; moved it to {set_aside(manager, candidate)}" if set_aside_corrupt else ""
      logging.warning("%s%s. Falling back to the step before it.", e, moved)
      continue
    if set_aside_corrupt and corrupt:
      manager.reload()
    return result
  raise CheckpointCorruptError(
      f"Every checkpoint in {manager.directory} is corrupt (steps {sorted(corrupt)}; "
      "the reasons are logged above).")


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
  """Turns a failure to read a step's files (folder `where`) into
  CheckpointCorruptError, one line naming the step, the file and why."""
  _quiet_abandoned_reads()
  try:
    yield
  except CheckpointMismatchError:
    raise
  except Exception as e:  # pylint: disable=broad-exception-caught
    cause = _read_error(e)
    if cause is None:
      raise
    raise CheckpointCorruptError(
        f"Checkpoint step {step} in {os.path.dirname(where)} is corrupt: "
        f"{_describe(cause, where)}") from e


def _read_error(e: BaseException | None) -> BaseException | None:
  """The first of `e` and its causes that is a read error (_READ_ERRORS), or None."""
  for _ in range(16):  # a chain of causes is short; never loop on a cyclic one
    if e is None:
      return None
    if isinstance(e, _READ_ERRORS):
      return e
    e = e.__cause__
  return None


_SHORT_VALUE = re.compile(r"is not valid for value of size (\d+)")


def _describe(error: BaseException, where: str) -> str:
  """A read error as one line; a short array file is named by its path.

  Tensorstore names the OCDBT database folder and the bytes it could not read ("...
  is not valid for value of size N"); the file cut short is the one of N bytes.
  """
  text = str(error).split(" [tensorstore_spec=")[0].strip().strip("'\"")
  text = (text.splitlines()[0] if text else type(error).__name__)[:1000]
  size = _SHORT_VALUE.search(text)
  if size and "://" not in where:
    short = [f for f in sorted(pathlib.Path(where).rglob("*"))
             if f.is_file() and f.stat().st_size == int(size.group(1))]
    if len(short) == 1:
      text = f"{short[0]} is cut short ({int(size.group(1)):,} bytes): {text}"
  return text


def _quiet_abandoned_reads() -> None:
  """Drops what the reads that a failed restore abandoned report later.

  Orbax runs a restore's reads in an event loop of its own and closes it when one read
  fails; the other reads go on in tensorstore. When each one ends, its callback
  schedules on the closed loop, whose RuntimeError("Event loop is closed") tensorstore
  hands to sys.unraisablehook; the reading coroutines left behind are finalised later,
  each raising its own tensorstore error, or Orbax's "error while reading" made of the
  GeneratorExit that closes it. A page of tracebacks for each, after the failure has
  been reported once (`_reading`). Those reports alone are dropped; every other one
  goes to the hook that was in place.
  """
  asyncio_log = logging.getLogger("asyncio")
  if not any(isinstance(f, _AbandonedReadTasks) for f in asyncio_log.filters):
    asyncio_log.addFilter(_AbandonedReadTasks())
  previous = sys.unraisablehook
  if getattr(previous, "drops_abandoned_reads", False):
    return

  def hook(unraisable):
    if not _is_abandoned_read_report(unraisable):
      previous(unraisable)

  hook.drops_abandoned_reads = True
  sys.unraisablehook = hook


class _AbandonedReadTasks(logging.Filter):
  """Drops asyncio's "Task exception was never retrieved" (or "Future ...") for the
  reading tasks and futures a failed restore left behind (collected later, each with
  its own page of traceback)."""

  def filter(self, record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    return not (_NEVER_RETRIEVED.match(str(record.msg)) and _is_read_failure(error))


# asyncio's report for a task or future collected with its exception unread; it names
# the object's class ("Task", "Future", "_GatheringFuture").
_NEVER_RETRIEVED = re.compile(r"\w+ exception was never retrieved")


# A tensorstore error's text starts with its status code ("OUT_OF_RANGE: ...").
_TENSORSTORE_STATUS = re.compile(r"[A-Z_]+: ")


def _is_abandoned_read_report(unraisable: Any) -> bool:
  error = unraisable.exc_value
  if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
    return any(frame.name == "call_soon_threadsafe"
               for frame in traceback.extract_tb(unraisable.exc_traceback))
  if not inspect.iscoroutine(unraisable.object):
    return False
  return _is_read_failure(error)


def _is_read_failure(error: BaseException | None) -> bool:
  """Whether `error` or one of its causes is a tensorstore read error, or the
  GeneratorExit that closed a reading coroutine."""
  for _ in range(16):  # the error and its causes
    if error is None:
      return False
    if isinstance(error, GeneratorExit) or (
        isinstance(error, ValueError) and _TENSORSTORE_STATUS.match(str(error))):
      return True
    error = error.__cause__
  return False


def set_aside(manager: ocp.CheckpointManager, step: int,
              folder: str = CORRUPT_FOLDER) -> str:
  """Moves a step out of the manager's folder to <checkpoints>/../<folder>/<step>
  (kept for inspection); returns where it went."""
  target = epath.Path(manager.directory).parent / folder / str(step)
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
  diffs = models.architecture_diffs(saved, wanted)
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
      f"{path} holds no checkpoint: expected a workdir (with checkpoints/: a training "
      "run's, or the --out of import_weights), its checkpoints/ folder, or a step "
      "folder checkpoints/<step>.")


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
  return _newest_intact(manager, lambda s: _load_step(manager, s, sharding),
                        set_aside_corrupt=False)


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


# --------------------------------------------------------------------------
# Initial weights (model.init_from): the merge rule.

# Architecture fields that do not change the backbone's arrays, only how it is used.
_BACKBONE_FIELDS = ("depth",)
_CLASSIFIER = "classifier/kernel"


def _head_kind(head: Any) -> str:
  return "musp" if "attention_conv" in head else "baseline"


def merge_init(fresh: Any, saved: Any, *, where: str, saved_model: Any = None,
               wanted_model: Any = None) -> tuple[dict, list[str]]:
  """Fresh model variables with saved weights merged in; returns (variables, notes).

  The one rule for starting from another model's weights ({"params", "batch_stats"}
  trees holding "backbone" and "head"):
    backbone     always taken: every array the model has must be saved with its shape;
    head         taken when the saved head is the same kind (MUSP or baseline); then
                 every head array must fit, except the classifiers, which keep their
                 fresh initialisation when the class count differs (a new dataset);
                 a head of the other kind is not used (the head starts fresh).
  Anything that does not fit raises CheckpointMismatchError naming the arrays, and the
  differing model fields when both model configs are given (saved_model, wanted_model).
  `notes` say what was taken and what starts fresh, for the log.
  """
  flat_fresh = {col: _flat(fresh.get(col, {})) for col in ("params", "batch_stats")}
  flat_saved = {col: _flat(saved.get(col, {})) for col in ("params", "batch_stats")}
  if not any(k.startswith("backbone/") for k in flat_saved["params"]):
    raise CheckpointMismatchError(f"{where} holds no backbone weights to start from.")
  fresh_head = _tree_get(fresh, "params", "head")
  saved_head = _tree_get(saved, "params", "head")
  use_head = saved_head is not None and _head_kind(saved_head) == _head_kind(fresh_head)
  taken = ("backbone/", "head/") if use_head else ("backbone/",)
  problems, kept_fresh = [], []
  merged = {}
  for col, leaves in flat_fresh.items():
    out = {}
    for path, value in leaves.items():
      if not path.startswith(taken):
        out[path] = value
        continue
      got = flat_saved[col].get(path)
      if got is None:
        problems.append(f"missing in checkpoint: {col}/{path} {tuple(value.shape)}")
      elif tuple(got.shape) == tuple(value.shape):
        out[path] = jax.numpy.asarray(got, value.dtype)
      elif path.endswith(_CLASSIFIER) and tuple(got.shape[:-1]) == tuple(value.shape[:-1]):
        out[path] = value  # another class count: a new classifier
        kept_fresh.append(f"{path} ({got.shape[-1]} classes -> {value.shape[-1]})")
      else:
        problems.append(f"shape of {col}/{path}: checkpoint {tuple(got.shape)}, model "
                        f"{tuple(value.shape)}")
    problems += [f"not in model: {col}/{k} {tuple(v.shape)}"
                 for k, v in flat_saved[col].items()
                 if k.startswith(taken) and k not in leaves]
    merged[col] = out
  if problems:
    fields = ""
    if saved_model is not None and wanted_model is not None:
      diffs = models.architecture_diffs(
          saved_model, wanted_model, models.ARCH_FIELDS if use_head else _BACKBONE_FIELDS)
      fields = (" (" + "; ".join(diffs) + ")") if diffs else ""
    shown = problems[:20] + ([f"... and {len(problems) - 20} more"]
                             if len(problems) > 20 else [])
    raise CheckpointMismatchError(
        f"{where} does not fit the model as initial weights{fields}:\n  "
        + "\n  ".join(shown))
  notes = [f"backbone from {where}"]
  if use_head:
    notes.append("head from the checkpoint" + (
        "; classifiers start fresh: " + ", ".join(kept_fresh) if kept_fresh else ""))
  elif saved_head is not None:
    notes.append(f"head starts fresh (the checkpoint's head is a {_head_kind(saved_head)} "
                 f"head, the model's a {_head_kind(fresh_head)} head)")
  else:
    notes.append("head starts fresh (the checkpoint has none)")
  return {col: _unflat(tree) for col, tree in merged.items()}, notes


def _flat(tree: Any) -> dict[str, Any]:
  return {path_str(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _unflat(flat: dict[str, Any]) -> dict:
  out: dict = {}
  for path, value in flat.items():
    *parents, leaf = path.split("/")
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def _tree_get(tree: Any, *keys: str) -> Any:
  for k in keys:
    if not hasattr(tree, "get"):
      return None
    tree = tree.get(k)
  return tree


def initial_variables(fresh: Any, init_from: str | os.PathLike, *,
                      model_config: Any = None) -> dict:
  """`fresh` variables with the weights of model.init_from merged in.

  init_from is a workdir (a training run's, or one import_weights wrote), its
  checkpoints/ folder or a step folder: `load_variables` reads its latest intact step
  (or that step) and `merge_init` merges it, saying in the log what it took and what
  starts fresh.
  """
  restored = load_variables(init_from)
  variables, notes = merge_init(fresh, restored.variables, where=restored.source,
                                saved_model=restored.run.config.get("model"),
                                wanted_model=model_config)
  logging.info("model.init_from: %s.", "; ".join(notes))
  return variables


def init_function(model_config: Any) -> Callable[[Any], dict] | None:
  """create_train_state's `init_variables` for config.model: None (fresh weights) when
  model.init_from is empty, else `initial_variables` from it."""
  if not model_config.init_from:
    return None
  return functools.partial(initial_variables, init_from=model_config.init_from,
                           model_config=model_config)


def jsonable(config: Any) -> dict:
  """ConfigDict / dict -> plain JSON types (tuples become lists)."""
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  return json.loads(json.dumps(config, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def log_saved(manager: ocp.CheckpointManager) -> None:
  logging.info("Checkpoints in %s: %s (best: %s)", manager.directory,
               manager.all_steps(), manager.best_step())
