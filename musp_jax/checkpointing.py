"""Orbax checkpoints: train state, data position and model signature in one step.

Each saved step holds three items:
  state   the TrainState (params, batch_stats, optimizer state, step),
  data    {"next_step": ...}: the PK sampler is a pure function of (seed, step), so the
          step at which to rebuild the input pipeline is the whole data position,
  model   the model config, so a checkpoint of another architecture is refused with
          the differing fields named instead of a shape error deep inside Orbax.
The latest `keep` steps are kept, and the best step by mAP is kept as well.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

METRIC = "mAP"


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the model the config describes."""


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
  # Handlers named up front, so a freshly opened manager can read metadata before
  # any save (restore checks shapes against it).
  # Orbax's array store wants absolute paths; users pass relative workdirs.
  return ocp.CheckpointManager(
      epath.Path(os.path.abspath(os.path.expanduser(directory))), options=options,
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "data": ocp.JsonCheckpointHandler(),
                     "model": ocp.JsonCheckpointHandler()})


def save(manager: ocp.CheckpointManager, step: int, state: Any, *,
         next_step: int, model_config: dict, metrics: dict | None = None) -> None:
  """Saves asynchronously; `manager.wait_until_finished()` before exiting."""
  manager.save(
      step,
      args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=ocp.args.JsonSave({"next_step": int(next_step)}),
          model=ocp.args.JsonSave(_jsonable(model_config)),
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


def restore(manager: ocp.CheckpointManager, abstract_state: Any, *,
            model_config: dict, step: int | None = None) -> tuple[Any, int, int]:
  """Restores `step` (default: latest) -> (state, step, next data step).

  Raises CheckpointMismatchError naming the differing model fields or arrays.
  """
  step = resolve_step(manager, step)
  saved_model = manager.restore(step, args=ocp.args.Composite(
      model=ocp.args.JsonRestore()))["model"]
  check_model_config(saved_model, _jsonable(model_config),
                     where=f"{manager.directory}/{step}")
  check_tree(manager.item_metadata(step)["state"], abstract_state,
             where=f"{manager.directory}/{step}")
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=ocp.args.JsonRestore(),
  ))
  return restored["state"], step, int(restored["data"]["next_step"])


# Fields that change parameter shapes or meaning; dtype and init_from do not.
_ARCH_FIELDS = ("depth", "last_stride", "head", "num_prototypes", "value_conv",
                "value_channels", "ese", "ese_reduction", "attention",
                "global_feature", "pooling",
                "global_branch")


def check_model_config(saved: dict, wanted: dict, *, where: str) -> None:
  diffs = [f"model.{k}: checkpoint has {saved.get(k)!r}, config asks {wanted.get(k)!r}"
           for k in _ARCH_FIELDS if saved.get(k) != wanted.get(k)]
  if diffs:
    raise CheckpointMismatchError(
        f"Checkpoint {where} was written for another architecture:\n  "
        + "\n  ".join(diffs))


def path_str(keys) -> str:
  """'params/backbone/conv1/kernel' whether the tree holds dicts or dataclasses."""
  return jax.tree_util.keystr(keys, simple=True, separator="/")


def check_tree(saved_metadata: Any, abstract: Any, *, where: str) -> None:
  """Compares array shapes by path; names every missing, extra or mis-shaped array."""
  saved = {path_str(k): tuple(getattr(v, "shape", ()) or ())
           for k, v in jax.tree_util.tree_leaves_with_path(saved_metadata)}
  wanted = {path_str(k): tuple(np.shape(v))
            for k, v in jax.tree_util.tree_leaves_with_path(abstract)}
  problems = [f"missing in checkpoint: {k} {wanted[k]}"
              for k in sorted(wanted.keys() - saved.keys())]
  problems += [f"not in model: {k} {saved[k]}" for k in sorted(saved.keys() - wanted.keys())]
  problems += [f"shape of {k}: checkpoint {saved[k]}, model {wanted[k]}"
               for k in sorted(wanted.keys() & saved.keys()) if saved[k] != wanted[k]]
  if problems:
    shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
    raise CheckpointMismatchError(
        f"Checkpoint {where} does not fit the model:\n  " + "\n  ".join(shown))


def _jsonable(config: Any) -> dict:
  """ConfigDict / dict -> plain JSON types (tuples become lists)."""
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  return json.loads(json.dumps(config, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def log_saved(manager: ocp.CheckpointManager) -> None:
  logging.info("Checkpoints in %s: %s (best: %s)", manager.directory,
               manager.all_steps(), manager.best_step())
