"""PK sampler: batch structure, purity in (seed, step), epoch semantics."""

import pickle

import numpy as np
import pytest

from musp_jax.data import sampling


def _labels(counts, seed=0) -> np.ndarray:
  """Identity i has counts[i] images, records shuffled (not grouped by id)."""
  labels = np.repeat(np.arange(len(counts)), counts)
  return np.random.default_rng(seed).permutation(labels)


def _check_pk(batch, labels, p, k):
  assert batch.shape == (p * k,)
  ids = labels[batch].reshape(p, k)
  assert (ids == ids[:, :1]).all(), "each row of K must share one identity"
  assert len(set(ids[:, 0])) == p, "the P identities must be distinct"


@pytest.mark.parametrize("steps", [1, 7, 40])
def test_steps_per_epoch_covers_the_images(steps):
  assert sampling.steps_per_epoch(64 * steps, 64) == steps
  assert sampling.steps_per_epoch(64 * steps - 1, 64) == steps
  assert sampling.steps_per_epoch(64 * steps + 1, 64) == steps + 1


def test_steps_per_epoch_veri776():
  assert sampling.steps_per_epoch(37778, 64) == 591  # ceil(590.28)
  with pytest.raises(ValueError, match="num_train_images=0"):
    sampling.steps_per_epoch(0, 64)


def test_every_batch_is_p_by_k_with_distinct_ids_over_epochs():
  counts = [1, 2, 3, 4, 5, 9, 12, 30, 2, 7, 1, 6, 8, 4]
  labels = _labels(counts)
  s = sampling.PKSampler(labels, num_ids=4, num_instances=4, seed=3)
  assert s.steps_per_epoch == int(np.ceil(len(labels) / 16))
  for step in range(5 * s.steps_per_epoch):
    _check_pk(s[step], labels, 4, 4)


def test_small_identities_are_sampled_with_replacement():
  labels = _labels([1, 2, 10, 10, 10, 10])
  single = np.flatnonzero(labels == 0)
  pair = set(np.flatnonzero(labels == 1))
  s = sampling.PKSampler(labels, num_ids=3, num_instances=4, seed=0)
  seen_single = seen_pair = 0
  for step in range(60):
    ids = labels[s[step]].reshape(3, 4)[:, 0]
    rows = s[step].reshape(3, 4)
    for row, ident in zip(rows, ids):
      if ident == 0:
        seen_single += 1
        assert (row == single[0]).all()  # its one image, four times
      if ident == 1:
        seen_pair += 1
        assert set(row) <= pair
  assert seen_single > 0 and seen_pair > 0


def test_batch_is_a_pure_function_of_seed_and_step():
  labels = _labels([5] * 30)
  a = sampling.PKSampler(labels, num_ids=4, num_instances=2, seed=7)
  b = sampling.PKSampler(labels, num_ids=4, num_instances=2, seed=7)
  far = 10 * a.steps_per_epoch + 3
  first = b[far]  # b jumps straight to step `far`
  for step in range(far + 1):
    a[step]  # a walks there through every earlier epoch
  np.testing.assert_array_equal(a[far], first)
  # A copy sent to another process gives the same batches.
  c = pickle.loads(pickle.dumps(a))
  for step in (0, 1, far):
    np.testing.assert_array_equal(c[step], a[step])
  other = sampling.PKSampler(labels, num_ids=4, num_instances=2, seed=8)
  assert any(not np.array_equal(other[t], a[t]) for t in range(5))


def test_epochs_differ():
  labels = _labels([4] * 20)
  s = sampling.PKSampler(labels, num_ids=4, num_instances=4, seed=0)
  e0, e1 = s.epoch_batches(0), s.epoch_batches(1)
  assert e0.shape == (s.steps_per_epoch, 16)
  assert not np.array_equal(e0, e1)


def test_an_epoch_deals_the_images_once():
  # 20 identities x 8 images, P=4, K=4: 10 steps of 16 cover the 160 images.
  # Dealing groups of K (official sampler) uses most images once per epoch;
  # drawing identities independently per batch would see ~65%.
  labels = _labels([8] * 20)
  s = sampling.PKSampler(labels, num_ids=4, num_instances=4, seed=0)
  assert s.steps_per_epoch == 10
  coverage = [len(np.unique(s.epoch_batches(e))) / len(labels)
              for e in range(20)]
  assert np.mean(coverage) > 0.85


def test_identities_are_drawn_in_proportion_to_their_groups():
  # As in the official sampler: an identity with 10 groups of K is drawn
  # about 10x as often as one with a single group.
  counts = [40] * 5 + [4] * 40
  labels = _labels(counts)
  s = sampling.PKSampler(labels, num_ids=4, num_instances=4, seed=1)
  ids = labels[np.concatenate([s.epoch_batches(e) for e in range(10)]).ravel()]
  per_id = np.bincount(ids, minlength=len(counts)) / 4  # groups drawn
  big, small = per_id[:5].mean(), per_id[5:].mean()
  assert 6 < big / small < 14


def test_errors_name_the_problem():
  with pytest.raises(ValueError, match="num_ids=5 identities.*only 3"):
    sampling.PKSampler(_labels([4, 4, 4]), num_ids=5, num_instances=4, seed=0)
  with pytest.raises(ValueError, match="non-empty 1-D"):
    sampling.PKSampler(np.zeros((2, 2), int), num_ids=1, num_instances=1, seed=0)
  s = sampling.PKSampler(_labels([4, 4]), num_ids=2, num_instances=2, seed=0)
  with pytest.raises(IndexError, match="step=-1"):
    s[-1]


def test_dataset_balanced_batches_take_a_fixed_share_of_each_dataset():
  # Dataset 0: 30 identities x 4 images; dataset 1: 3 x 4. P = 5 over 2 datasets:
  # 3 identities from dataset 0, 2 from dataset 1, in every batch, whatever their sizes.
  labels = np.concatenate([_labels([4] * 30), 30 + _labels([4] * 3, seed=1)])
  domains = (labels >= 30).astype(int)
  s = sampling.PKSampler(labels, num_ids=5, num_instances=2, seed=4, domains=domains)
  assert sampling.balanced_shares(5, 2) == [3, 2]
  assert s.steps_per_epoch == int(np.ceil(len(labels) / 10))  # the union's epoch
  for step in range(3 * s.steps_per_epoch):
    batch = s[step]
    _check_pk(batch, labels, 5, 2)
    np.testing.assert_array_equal(domains[batch], [0] * 6 + [1] * 4)
  # Without domains the small dataset gets its share of the union: ~1 in 11 identities.
  union = sampling.PKSampler(labels, num_ids=5, num_instances=2, seed=4)
  drawn = domains[np.concatenate([union.epoch_batches(e) for e in range(5)])]
  assert drawn.mean() < 0.2
  # Still a pure function of (seed, step), sent to workers or not.
  again = pickle.loads(pickle.dumps(sampling.PKSampler(
      labels, num_ids=5, num_instances=2, seed=4, domains=domains)))
  np.testing.assert_array_equal(again[7], s[7])
  with pytest.raises(ValueError, match=r"2 of the input.num_ids identities per batch come "
                                       r"from dataset 1 of the training data \(input."
                                       r"balance_datasets\), but it has only 1 identities"):
    sampling.PKSampler(labels, num_ids=5, num_instances=2, seed=0,
                       domains=np.where(labels < 32, 0, 1))
