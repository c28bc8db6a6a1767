"""PK sampling: batch b is a pure function of (seed, b), numpy only.

A batch holds P distinct identities with K images each (identity-major: rows
[p*K, (p+1)*K) share one label). Within an epoch the batches follow the
official sampler (RandomIdentitySampler): every identity's images are shuffled
and dealt into groups of K (an identity with fewer than K images is drawn with
replacement up to K; a remainder smaller than K is dropped), then each batch
takes one group from P identities chosen uniformly among those with groups
left. The official sampler ends the epoch when fewer than P identities have
groups left; here the epoch has a fixed length (`steps_per_epoch`,
docs/design.md section 3) and a fresh deal is appended when that happens, so the schedule in
epochs and the data position in steps stay exact.

Epoch e's arrangement depends only on (seed, e, labels); it is computed once
per process and cached, so any worker can produce any step (resume at step s
needs no replay and no worker-count bookkeeping).

Several training datasets are one union of records with disjoint labels
(musp_jax/data/training_set.py): batches draw from the union, or, given each record's
dataset (`domains`), take a fixed share of identities from every dataset
(input.balance_datasets).
"""

from __future__ import annotations

import math
import threading

import numpy as np

# Keeps the sampler's random stream apart from the augmentation's, which is
# seeded from the same run seed.
_SAMPLER_STREAM = 0


def steps_per_epoch(num_train_images: int, global_batch_size: int) -> int:
  """PK batches covering the training images once: ceil(N / batch)."""
  if num_train_images <= 0 or global_batch_size <= 0:
    raise ValueError(
        f"steps_per_epoch(num_train_images={num_train_images}, "
        f"global_batch_size={global_batch_size}): both must be positive."
    )
  return math.ceil(num_train_images / global_batch_size)


class PKSampler:
  """Maps a global step to the P*K record indices of that step's batch.

  With `domains` (the dataset of each record, 0..D-1), batches are dataset-balanced:
  dataset d always gives `balanced_shares(P, D)[d]` of the P identities (its rows come
  in dataset order), each dataset dealt and drawn as above on its own, whatever its
  size; without, the P identities are drawn from the union of all records.
  """

  def __init__(
      self,
      labels: np.ndarray,
      *,
      num_ids: int,
      num_instances: int,
      seed: int,
      domains: np.ndarray | None = None,
  ):
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
      raise ValueError(f"PKSampler: labels must be a non-empty 1-D array, got "
                       f"shape {labels.shape}.")
    if num_ids < 1 or num_instances < 1:
      raise ValueError(f"PKSampler: num_ids={num_ids} and num_instances="
                       f"{num_instances} must be >= 1.")
    if seed < 0:
      raise ValueError(f"PKSampler: seed={seed} must be >= 0.")
    self.num_ids = num_ids
    self.num_instances = num_instances
    self.seed = seed
    self.batch_size = num_ids * num_instances
    self.steps_per_epoch = steps_per_epoch(len(labels), self.batch_size)
    if domains is None:
      self._parts = [_Deals(labels, np.arange(len(labels)), num_ids, num_instances, (),
                            "the training split")]
    else:
      domains = np.asarray(domains)
      if domains.shape != labels.shape:
        raise ValueError(f"PKSampler: domains has shape {domains.shape}, labels "
                         f"{labels.shape}; expected one dataset index per record.")
      shares = balanced_shares(num_ids, int(domains.max()) + 1)
      self._parts = []
      for d, share in enumerate(shares):
        records = np.flatnonzero(domains == d)
        if records.size == 0:
          raise ValueError(f"PKSampler: dataset {d} has no records.")
        self._parts.append(_Deals(labels[records], records, share, num_instances, (d,),
                                  f"dataset {d} of the training data"))
    self._cache: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()

  def __getstate__(self):
    # Sent to grain workers: without the cache (rebuilt per process) and lock.
    state = self.__dict__.copy()
    state["_cache"] = {}
    del state["_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __getitem__(self, step: int) -> np.ndarray:
    """Record indices (P*K,) int64 of the batch at global `step`."""
    if step < 0:
      raise IndexError(f"PKSampler: step={step} must be >= 0.")
    epoch, row = divmod(int(step), self.steps_per_epoch)
    return self.epoch_batches(epoch)[row]

  def epoch_batches(self, epoch: int) -> np.ndarray:
    """All batches of `epoch`: (steps_per_epoch, P*K) record indices."""
    with self._lock:
      batches = self._cache.get(epoch)
    if batches is None:
      batches = np.concatenate(
          [part.arrange(self.seed, epoch, self.steps_per_epoch) for part in self._parts],
          axis=1)
      with self._lock:
        # Workers move forward through epochs: the newest two are enough.
        if len(self._cache) >= 2:
          del self._cache[min(self._cache)]
        self._cache[epoch] = batches
    return batches


def balanced_shares(num_ids: int, num_datasets: int) -> list[int]:
  """Identities per batch from each dataset when batches are dataset-balanced: P split
  as evenly as it goes, the first P mod D datasets taking one more."""
  if num_ids < num_datasets:
    raise ValueError(
        f"PKSampler: input.num_ids={num_ids} identities per batch cannot take one from "
        f"each of the {num_datasets} datasets (input.balance_datasets).")
  return [num_ids // num_datasets + (d < num_ids % num_datasets)
          for d in range(num_datasets)]


class _Deals:
  """The official sampler's arrangement of one set of records (module docstring)."""

  def __init__(self, labels: np.ndarray, records: np.ndarray, num_ids: int,
               num_instances: int, stream: tuple[int, ...], what: str):
    ids, inverse = np.unique(labels, return_inverse=True)
    if len(ids) < num_ids and not stream:
      raise ValueError(
          f"PKSampler: input.num_ids={num_ids} identities per batch, but {what} has only "
          f"{len(ids)} identities."
      )
    if len(ids) < num_ids:
      raise ValueError(
          f"PKSampler: {num_ids} of the input.num_ids identities per batch come from "
          f"{what} (input.balance_datasets), but it has only {len(ids)} identities.")
    self.num_ids = num_ids
    self.num_instances = num_instances
    self.batch_size = num_ids * num_instances
    self._records = records  # local record -> index in the whole training data
    self._stream = stream
    self._identity = inverse.astype(np.int64)  # record -> 0..num_identities-1
    self._num_identities = len(ids)

  def arrange(self, seed: int, epoch: int, steps: int) -> np.ndarray:
    """(steps, P*K) record indices of `epoch`, a pure function of (seed, epoch)."""
    rng = np.random.default_rng([seed, _SAMPLER_STREAM, epoch, *self._stream])
    return self._records[self._arrange(rng, steps)]

  def _deal(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Shuffles each identity's images into groups of K.

    Returns groups (G, K) record indices, grouped by identity in identity
    order, and the owner identity (G,) of each group.
    """
    k, n_ids = self.num_instances, self._num_identities
    # Shuffle within identities: sort by identity, ties broken by a random key.
    order = np.lexsort((rng.random(len(self._identity)), self._identity))
    owner = self._identity[order]
    counts = np.bincount(owner, minlength=n_ids)
    starts = np.cumsum(counts) - counts
    rank = np.arange(len(order)) - starts[owner]  # position within identity
    keep = rank < counts[owner] - counts[owner] % k  # drop remainders < K
    groups = order[keep].reshape(-1, k)
    group_owner = owner[keep][::k]
    # Identities with fewer than K images: K draws with replacement.
    small = np.flatnonzero(counts < k)
    picks = rng.integers(0, counts[small, None], size=(len(small), k))
    small_groups = order[starts[small, None] + picks]
    groups = np.concatenate([groups, small_groups])
    group_owner = np.concatenate([group_owner, small])
    by_owner = np.argsort(group_owner, kind="stable")
    return groups[by_owner], group_owner[by_owner]

  def _arrange(self, rng: np.random.Generator, steps: int) -> np.ndarray:
    n_ids, p = self._num_identities, self.num_ids
    groups, owner = self._deal(rng)
    left = np.bincount(owner, minlength=n_ids)  # groups left per identity
    heads = np.cumsum(left) - left  # next unused group of each identity
    out = np.empty((steps, self.batch_size), np.int64)
    for row in range(steps):
      num_available = np.count_nonzero(left)
      if num_available < p:
        # Official: the epoch ends here. Here: deal again and carry on, the
        # leftover groups of each identity first.
        used = np.arange(len(groups)) < heads[owner]
        fresh_groups, fresh_owner = self._deal(rng)
        groups = np.concatenate([groups[~used], fresh_groups])
        owner = np.concatenate([owner[~used], fresh_owner])
        by_owner = np.argsort(owner, kind="stable")
        groups, owner = groups[by_owner], owner[by_owner]
        left = np.bincount(owner, minlength=n_ids)
        heads = np.cumsum(left) - left
        num_available = np.count_nonzero(left)
      chosen = self._choose(rng, left, num_available)
      out[row] = groups[heads[chosen]].reshape(-1)
      heads[chosen] += 1
      left[chosen] -= 1
    return out

  def _choose(
      self, rng: np.random.Generator, left: np.ndarray, num_available: int
  ) -> np.ndarray:
    """P distinct identities, uniform among those with groups left."""
    p = self.num_ids
    if num_available * 4 < len(left):
      return rng.choice(np.flatnonzero(left), size=p, replace=False)
    # Most identities are available: rejection sampling (uniform over the
    # valid draws, like sequential sampling without replacement) avoids
    # scanning all identities for every batch.
    chosen: list[int] = []
    while len(chosen) < p:
      for i in rng.integers(0, len(left), size=2 * p).tolist():
        if left[i] > 0 and i not in chosen:
          chosen.append(i)
          if len(chosen) == p:
            break
    return np.asarray(chosen, np.int64)
