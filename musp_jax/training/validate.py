"""Checks a run config before anything runs: every field training reads.

    validate.check_config(config, mode="train")  # or "eval"; raises ConfigError

Each bad field is reported as `key=value: expected ...`, all of them in one error, before
the first step: a typo in eval.distance must not surface at the first evaluation, ten
epochs into training. Evaluation (`mode="eval"`) checks the fields evaluation reads.
What needs the training data (identities, the schedule against a restored step) is
checked by `check_identities` and `check_resume` as soon as the data is known.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax

from musp_jax.data import datasets
from musp_jax.data import sampling
from musp_jax import models
from musp_jax.core import preprocess
from musp_jax.retrieval import ranking
from musp_jax.retrieval import rerank
from musp_jax.models import fast_conv
from musp_jax.models import resnet

MODES = ("train", "eval")


class ConfigError(ValueError):
  """A config field holds a value the run cannot use; the message names each one."""


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
  return (isinstance(v, (int, float)) and not isinstance(v, bool)
          and math.isfinite(v))


class _Checker:
  """Collects `key=value: expected ...` problems of one config."""

  def __init__(self, config):
    self.config = config
    self.problems: list[str] = []

  def get(self, key: str) -> Any:
    node = self.config
    for part in key.split("."):
      node = node[part]
    return node

  def fail(self, key: str, expected: str) -> None:
    self.problems.append(f"{key}={self.get(key)!r}: expected {expected}")

  def expect(self, key: str, ok: Callable[[Any], bool], expected: str) -> bool:
    value = self.get(key)
    try:
      good = bool(ok(value))
    except (TypeError, ValueError):
      good = False
    if not good:
      self.fail(key, expected)
    return good

  def int_at_least(self, key: str, low: int) -> bool:
    return self.expect(key, lambda v: _is_int(v) and v >= low, f"an integer >= {low}")

  def number(self, key: str, ok: Callable[[float], bool], expected: str) -> bool:
    return self.expect(key, lambda v: _is_number(v) and ok(v), expected)

  def choice(self, key: str, choices: Sequence[Any]) -> bool:
    return self.expect(key, lambda v: v in choices,
                       "one of " + ", ".join(repr(c) for c in choices))

  def boolean(self, key: str) -> bool:
    return self.expect(key, lambda v: isinstance(v, bool), "True or False")

  def string(self, key: str, *, empty: bool = True) -> bool:
    return self.expect(key, lambda v: isinstance(v, str) and (empty or v),
                       "a string" if empty else "a non-empty string")


def check_config(config: Any, *, mode: str = "train", num_devices: int | None = None,
                 num_processes: int | None = None) -> None:
  """Raises ConfigError naming every field of `config` that `mode` cannot use.

  num_devices / num_processes default to JAX's (batches are split over them).
  """
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}; expected one of {MODES}.")
  num_devices = jax.device_count() if num_devices is None else num_devices
  num_processes = jax.process_count() if num_processes is None else num_processes
  c = _Checker(config)
  c.int_at_least("seed", 0)
  _check_dataset(c, train=mode == "train")
  _check_model(c)
  _check_input(c, train=mode == "train", num_devices=num_devices,
               num_processes=num_processes)
  _check_eval(c, num_devices=num_devices, num_processes=num_processes)
  c.string("compilation_cache_dir")
  c.boolean("distributed")
  if mode == "train":
    _check_loss(c)
    _check_optim(c)
    c.int_at_least("eval.every_epochs", 1)
    c.int_at_least("log_every_steps", 1)
    c.int_at_least("checkpoint_every_steps", 1)
    c.int_at_least("keep_checkpoints", 1)
  if c.problems:
    head = "config: " if len(c.problems) == 1 else f"config, {len(c.problems)} problems: "
    raise ConfigError(head + "; ".join(c.problems) + ".")


def _check_dataset(c: _Checker, *, train: bool) -> None:
  data_ok = c.string("dataset.data_dir", empty=False)
  c.string("dataset.manual_dir")
  c.boolean("dataset.combine_all")
  # Training reads every training dataset; evaluation only names them.
  entries = _check_entries(c, "dataset.name", built=train and data_ok)
  if entries is None:
    return
  with_configs = [e for e in entries if datasets.config_names(e.table)]
  if with_configs:
    c.choice("dataset.builder_config", datasets.config_names(with_configs[0].table))
  else:
    names = ", ".join(e.name for e in entries)
    c.expect("dataset.builder_config", lambda v: v in ("", None),
             f"'' ({names} {'has' if len(entries) == 1 else 'have'} no builder configs)")


def _check_entries(c: _Checker, key: str, *, built: bool,
                   empty: str = "") -> list[datasets.Entry] | None:
  """The entries of a comma-separated dataset list, or None (a problem recorded).

  `built`: a user dataset must be built in dataset.data_dir (the licensed ones are
  reported with their build command when read). `empty`: what an empty list means, if
  it may be empty.
  """
  value = c.get(key)
  if not isinstance(value, str):
    c.fail(key, "a string: a dataset, or several comma-separated")
    return None
  names = datasets.split_names(value)
  if not names:
    if not empty:
      c.fail(key, "a dataset, or several comma-separated, e.g. 'veri776,vehicle_id'")
    return [] if empty else None
  known = [n for n, row in datasets.DATASETS.items() if not row.named_builds]
  data_dir = c.get("dataset.data_dir")
  for name in names:
    if names.count(name) > 1:
      c.fail(key, f"each dataset once ({name!r} is listed {names.count(name)} times)")
      return None
    if name in known:
      continue
    own = datasets.user_datasets(data_dir) if isinstance(data_dir, str) and data_dir else []
    try:
      datasets.check_user_dataset_name(name)
      usable = name in own or not built
    except ValueError:
      usable = False
    if not usable:
      where = (f"built in {data_dir}: {', '.join(own)}" if own else
               f"none is built in {data_dir}")
      c.fail(key, f"{empty + ' or ' if empty else ''}datasets among "
             f"{', '.join(map(repr, known))} or of your own images (`python -m "
             f"musp_jax.build_dataset folder --manual_dir DIR --name NAME`; {where}); "
             f"{name!r} is neither")
      return None
  return [datasets.entry(n, c.get("dataset.builder_config")) for n in names]


def _check_model(c: _Checker) -> None:
  c.choice("model.backbone", resnet.BACKBONES)
  depth_ok = c.choice("model.depth", sorted(resnet.STAGE_SIZES))
  c.choice("model.last_stride", (1, 2))
  c.choice("model.layer3_stride", (1, 2))
  c.choice("model.padding", resnet.PADDINGS)
  c.choice("model.conv_impl", fast_conv.CONV_IMPLS)
  if c.string("model.init_from") and c.get("model.init_from"):
    c.expect("model.init_from", lambda v: os.path.isdir(os.path.expanduser(v)),
             "a folder written by `python -m musp_jax.import_weights`, or a training "
             "workdir, its checkpoints/ folder or a step folder")
  if depth_ok:
    try:  # the head's own checks (choices, n, dtype), without building any weights
      models.build_model(c.config.model, 1)
    except ValueError as e:
      c.problems.append(str(e).rstrip("."))


def _check_input(c: _Checker, *, train: bool, num_devices: int,
                 num_processes: int) -> None:
  size_ok = c.expect(
      "input.image_size",
      lambda v: len(v) == 2 and all(_is_int(s) and s > 0 for s in v),
      "(height, width), two positive integers, e.g. (256, 256)")
  strides = (c.get("model.last_stride"), c.get("model.layer3_stride"))
  if size_ok and all(s in (1, 2) for s in strides):
    stride = resnet.output_stride(*strides)
    c.expect("input.image_size", lambda v: min(v) >= stride,
             f"each side >= {stride} pixels: the backbone reduces its input {stride}x "
             f"(model.last_stride={strides[0]}, model.layer3_stride={strides[1]})")
  c.choice("input.normalize", list(preprocess.NORMALIZE_CONSTANTS))
  c.int_at_least("input.num_workers", 0)
  c.int_at_least("input.prefetch_buffer", 1)
  if not train:
    return
  p_ok = c.int_at_least("input.num_ids", 1)
  k_ok = c.int_at_least("input.num_instances", 1)
  c.boolean("input.balance_datasets")
  if p_ok and k_ok:
    batch = c.get("input.num_ids") * c.get("input.num_instances")
    for count, what in ((num_devices, "devices"), (num_processes, "processes")):
      if batch % count:
        c.problems.append(
            f"input.num_ids * input.num_instances = {batch}: expected a multiple of the "
            f"{count} {what} (the batch is split evenly over them)")
        break
  for key in ("input.translate_prob", "input.flip_prob", "input.erase_prob"):
    c.number(key, lambda v: 0 <= v <= 1, "a probability in [0, 1]")
  c.number("input.translate_scale", lambda v: v >= 1, "a number >= 1")
  c.expect("input.erase_area",
           lambda v: len(v) == 2 and all(map(_is_number, v)) and 0 <= v[0] <= v[1] <= 1,
           "(low, high) area fractions with 0 <= low <= high <= 1")
  c.number("input.erase_min_aspect", lambda v: 0 < v <= 1, "a number in (0, 1]")
  c.expect("input.erase_fill", lambda v: len(v) == 3 and all(map(_is_number, v)),
           "three numbers (R, G, B)")


def _check_eval(c: _Checker, *, num_devices: int, num_processes: int) -> None:
  targets = _check_entries(c, "eval.dataset", built=True, empty="'' (the training datasets)")
  if targets is not None:
    names = [e.name for e in targets] or datasets.split_names(c.get("dataset.name"))
    for name in names:
      sizes = datasets.test_sizes(name) if name in datasets.DATASETS else {}
      if sizes and not c.expect("eval.test_size", lambda v, sizes=sizes: v in sizes,
                                f"one of {', '.join(map(repr, sizes))} ({name}'s test sets)"):
        break
    if c.get("dataset.combine_all") is True:
      trained = set(datasets.split_names(c.get("dataset.name")))
      if not targets or trained & set(names):
        c.fail("eval.dataset", "datasets not trained on: dataset.combine_all=True trains "
               f"on the test identities of {', '.join(sorted(trained))}, whose protocols "
               "would rank vehicles the model has learnt")
  if c.int_at_least("eval.batch_size", 1):
    for count, what in ((num_devices, "devices"), (num_processes, "processes")):
      if c.get("eval.batch_size") % count:
        c.fail("eval.batch_size", f"a multiple of the {count} {what} (each evaluation "
               "batch is split evenly over them)")
        break
  c.choice("eval.distance", ranking.DISTANCES)
  c.boolean("eval.flip")
  c.boolean("eval.rerank")
  c.int_at_least("eval.query_block", 1)
  rerank_ok = c.int_at_least("eval.rerank_k1", 1)
  if rerank_ok:
    top = c.get("eval.rerank_k1") + 1
    rerank_ok = c.expect("eval.rerank_k2", lambda v: _is_int(v) and 1 <= v <= top,
                         f"an integer in 1..eval.rerank_k1 + 1 = {top} (the mean is over "
                         "the k2 nearest of the k1 + 1 kept)")
  rerank_ok &= c.number("eval.rerank_lambda", lambda v: 0 <= v <= 1, "a number in [0, 1]")
  c.boolean("eval.aqe")
  c.int_at_least("eval.qe_times", 1)
  c.int_at_least("eval.qe_k", 1)
  c.number("eval.qe_alpha", lambda v: True, "a finite number")
  if rerank_ok and c.get("eval.rerank") is True and not c.problems:
    _check_rerank_memory(c)
  c.int_at_least("eval.vehicleid_trials", 1)
  c.int_at_least("eval.vehicleid_seed", 0)


def rerank_memory_problem(num_query: int, num_gallery: int, *, feature_values: int,
                          k1: int, k2: int, query_block: int, aqe: bool,
                          available: int, dataset: str = "") -> str | None:
  """Why sparse re-ranking of this set would not fit in `available` bytes, or None.

  feature_values: P * C (an upper bound is fine); AQE keeps a second copy. dataset:
  the set's name, when the message must say which of several.
  """
  n = num_query + num_gallery
  features = n * feature_values * 4 * (2 if aqe else 1)
  parts = max(1, feature_values // 2048)
  state = rerank.memory_estimate(num_query, num_gallery, parts=parts,
                                 channels=feature_values // parts, k1=k1, k2=k2,
                                 query_block=query_block)["typical"]
  if features + state <= available:
    return None
  gib = 2.0**30
  of = f" of {dataset}" if dataset else ""
  return (f"eval.rerank=True: k-reciprocal re-ranking of {num_query:,} queries and "
          f"{num_gallery:,} gallery images{of} needs about "
          f"{(features + state) / gib:.1f} GiB (features {features / gib:.1f} GiB"
          f"{' with AQE' if aqe else ''}, re-ranking "
          f"{state / gib:.1f} GiB with k1={k1}, k2={k2}) and this machine has "
          f"{available / gib:.1f} GiB: expected a smaller test set, eval.rerank=False, or "
          "a larger machine")


def _check_rerank_memory(c: _Checker) -> None:
  """Refuses re-ranking a built evaluation set that would not fit in host memory (the
  evaluation datasets are ranked one after another: each must fit)."""
  config = c.config
  try:
    targets = datasets.eval_sets(config)
  except (ValueError, KeyError, OSError):
    return  # reported by the dataset checks, or when the data is read
  arch = models.architecture(config.model)
  width = resnet.output_channels(arch["depth"])
  values = width * (arch["num_prototypes"] if arch["head"] == "musp" else 1)
  for target in targets:
    e = target.entry
    kw = dict(data_dir=config.dataset.data_dir, builder_config=e.builder_config)
    try:
      if not datasets.is_built(e.table, **kw):
        continue  # its sizes are known once it is built
      splits = datasets.get_builder(e.table, **kw).info.splits
      sizes = {role: splits[split].num_examples for role, split in target.splits.items()}
    except (ValueError, KeyError):
      continue  # reported by the dataset checks
    total = sum(sizes.values())
    num_query = sizes.get("query", total // 2)
    problem = rerank_memory_problem(
        num_query, total - num_query, feature_values=values, k1=c.get("eval.rerank_k1"),
        k2=c.get("eval.rerank_k2"), query_block=c.get("eval.query_block"),
        aqe=c.get("eval.aqe") is True,
        available=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        dataset=target.row_name if len(targets) > 1 else "")
    if problem:
      c.problems.append(problem)


def _check_loss(c: _Checker) -> None:
  for key in ("loss.id_weight", "loss.triplet_weight", "loss.diversity_weight"):
    c.number(key, lambda v: v >= 0, "a number >= 0")
  c.number("loss.label_smoothing", lambda v: 0 <= v < 1, "a number in [0, 1)")
  c.expect("loss.triplet_margin", lambda v: v is None or (_is_number(v) and v >= 0),
           "a number >= 0, or None for the soft margin")


def _check_optim(c: _Checker) -> None:
  c.number("optim.lr", lambda v: v > 0, "a number > 0")
  for key in ("optim.b1", "optim.b2"):
    c.number(key, lambda v: 0 <= v < 1, "a number in [0, 1)")
  c.number("optim.eps", lambda v: v > 0, "a number > 0")
  for key in ("optim.weight_decay", "optim.head_lr_mult", "optim.grad_clip"):
    c.number(key, lambda v: v >= 0, "a number >= 0")
  if c.string("optim.wd_exclude"):
    try:
      re.compile(c.get("optim.wd_exclude"))
    except re.error as e:
      c.fail("optim.wd_exclude", f"a regular expression ({e})")
  c.int_at_least("optim.num_epochs", 1)
  c.int_at_least("optim.warmup_epochs", 0)
  c.number("optim.warmup_factor", lambda v: 0 < v <= 1, "a number in (0, 1]")
  c.expect("optim.milestones",
           lambda v: all(_is_int(m) and m > 0 for m in v) and list(v) == sorted(set(v)),
           "increasing positive epochs, e.g. (30, 60)")
  c.number("optim.gamma", lambda v: v > 0, "a number > 0")


def check_identities(config: Any, identities: dict[str, int]) -> None:
  """PK batches draw input.num_ids distinct identities from the training data
  (`identities`: per training dataset), and with input.balance_datasets a fixed share
  of them from each dataset."""
  total, p = sum(identities.values()), config.input.num_ids
  what = ", ".join(f"{name} {n}" for name, n in identities.items())
  if p > total:
    raise ConfigError(
        f"config: input.num_ids={p}: expected at most the {total} identities of the "
        f"training data ({what}).")
  if config.input.balance_datasets and len(identities) > 1:
    try:
      shares = sampling.balanced_shares(p, len(identities))
    except ValueError as e:
      raise ConfigError(f"config: {str(e).removeprefix('PKSampler: ')}") from None
    for (name, n), share in zip(identities.items(), shares):
      if share > n:
        raise ConfigError(
            f"config: input.num_ids={p} with input.balance_datasets takes {share} "
            f"identities from {name} per batch; it has {n} ({what}).")


def check_resume(restored_step: int, *, total_steps: int, steps_per_epoch: int,
                 config: Any, where: str) -> None:
  """A checkpoint beyond this config's last step was trained with another schedule."""
  if restored_step <= total_steps:
    return
  raise ConfigError(
      f"{where}: checkpoint step {restored_step} is past the end of this config's "
      f"schedule, {total_steps} steps (optim.num_epochs={config.optim.num_epochs} x "
      f"{steps_per_epoch} steps per epoch at input.num_ids * input.num_instances = "
      f"{config.input.num_ids * config.input.num_instances}); it was trained with "
      "another dataset size or batch. Train in a new --workdir, or use the config it "
      "was trained with.")
