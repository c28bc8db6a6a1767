"""The training data of a run: one dataset's train split, or several datasets at once.

    data = training_set.load(config)  # config.dataset.name = "veri776,vehicle_id"
    data.source[i]               # record i (grain workers read records by index)
    data.labels[i]               # its label, 0..K-1 over every dataset, none shared
    data.domains[i]              # its dataset, an index into data.names
    data.label_identities[label] # ("veri776", 4): the dataset and vehicle id of a label

Labels: the datasets in name order (datasets.training_entries, whatever order the
config lists them in), each with its builder's labels (its training vehicle ids,
sorted) offset by the class counts of the datasets before it. So `veri776,vehicle_id,
veri_wild` has 13,164 + 576 + 30,671 = 44,411 classes: VehicleID's first (vehicle_id <
veri776 < veri_wild), then VeRi-776's, then VERI-Wild's.

`dataset.combine_all` (fast-reid's COMBINEALL): the images of each dataset's largest
test set (datasets.largest_test_splits) join its training images; its test vehicles get
the next labels of that dataset, in vehicle-id order (a test vehicle that is also a
training one, which own data may have, keeps its label). Its protocols then rank
vehicles the model was trained on: training/validate.py refuses to evaluate on them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from musp_jax.data import datasets


@dataclasses.dataclass(frozen=True)
class TrainingSet:
  names: tuple[str, ...]  # the datasets, in label order
  source: Sequence[dict[str, Any]]  # every training record, dataset after dataset
  labels: np.ndarray  # (N,) label of each record
  domains: np.ndarray  # (N,) dataset of each record (index into names)
  label_identities: tuple[tuple[str, int], ...]  # (dataset, vehicle id) of each label

  @property
  def num_classes(self) -> int:
    return len(self.label_identities)

  def identities(self) -> dict[str, int]:
    """Identities with at least one training image, per dataset (PK batches draw them)."""
    return {name: len(np.unique(self.labels[self.domains == d]))
            for d, name in enumerate(self.names)}


class UnionSource(Sequence):
  """Several record sequences as one (pickles with its parts, for grain workers)."""

  def __init__(self, parts: Sequence[Sequence[dict[str, Any]]]):
    self.parts = list(parts)
    self._starts = np.cumsum([0] + [len(p) for p in self.parts])

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __getitem__(self, i: int) -> dict[str, Any]:
    n = len(self)
    i = i.__index__()
    if not -n <= i < n:
      raise IndexError(f"training records: index {i} out of range [0, {n}).")
    i %= n
    part = int(np.searchsorted(self._starts, i, side="right")) - 1
    return self.parts[part][i - int(self._starts[part])]


def load(config: Any) -> TrainingSet:
  """Builds (synthetic) or finds the training datasets of a run config; see the module
  docstring for the labels."""
  ds = config.dataset
  names, parts, labels, domains, identities = [], [], [], [], []
  for d, e in enumerate(datasets.training_entries(config)):
    e.ensure_built(ds.data_dir, ds.manual_dir)
    index = e.split_index("train", ds.data_dir)
    # Label -> vehicle id; a label whose images were all unreadable keeps its place.
    vehicle_ids = np.zeros(datasets.num_classes(
        e.table, data_dir=ds.data_dir, builder_config=e.builder_config), np.int64)
    vehicle_ids[index["label"]] = index["vehicle_id"]
    sources, local = [e.load_split("train", ds.data_dir)], [index["label"]]
    if ds.combine_all:
      label_of = dict(zip(index["vehicle_id"].tolist(), index["label"].tolist()))
      tests = [(split, e.split_index(split, ds.data_dir)["vehicle_id"])
               for split in datasets.largest_test_splits(e, ds.data_dir)]
      new = sorted(set(np.concatenate([v for _, v in tests]).tolist()) - label_of.keys())
      label_of.update({v: len(vehicle_ids) + i for i, v in enumerate(new)})
      vehicle_ids = np.concatenate([vehicle_ids, np.asarray(new, np.int64)])
      for split, vids in tests:
        sources.append(e.load_split(split, ds.data_dir))
        local.append(np.asarray([label_of[v] for v in vids.tolist()], np.int64))
    offset = len(identities)
    names.append(e.name)
    parts.extend(sources)
    labels.extend(offset + np.asarray(x, np.int64) for x in local)
    domains.extend(np.full(len(x), d, np.int64) for x in local)
    identities.extend((e.name, int(v)) for v in vehicle_ids)
  return TrainingSet(
      names=tuple(names), source=parts[0] if len(parts) == 1 else UnionSource(parts),
      labels=np.concatenate(labels), domains=np.concatenate(domains),
      label_identities=tuple(identities))
