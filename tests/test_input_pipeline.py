"""grain pipelines: PK batches, worker/process independence, resume, eval."""

import io
import multiprocessing
import os
import pathlib
import signal
import subprocess
import sys
import time

import cv2
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np
from PIL import Image
import pytest

from configs import common
from musp_jax.data import augment
from musp_jax.data import input_pipeline

ROOT = pathlib.Path(__file__).resolve().parents[1]
P, K = 4, 2
GLOBAL_BATCH = P * K


def _config(num_workers: int = 0):
  c = common.get_config().input
  c.image_size = (32, 32)
  c.num_ids = P
  c.num_instances = K
  c.num_workers = num_workers
  return c


@pytest.fixture(scope="module")
def data():
  """~45 JPEG records of 11 identities with 1-8 images, varied sizes."""
  rng = np.random.default_rng(0)
  counts = [1, 2, 3, 4, 5, 6, 7, 8, 3, 2, 4]
  labels = rng.permutation(np.repeat(np.arange(len(counts)), counts))
  source = []
  for i, label in enumerate(labels):
    h, w = rng.integers(20, 70, size=2)
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    source.append({"image": buf.getvalue(), "label": int(label),
                   "file_name": f"{i:04d}.jpg"})
  return source, labels.astype(np.int64)


class _WorkerCheckingSource:
  """The records, checking inside grain workers that accelerators are hidden."""

  def __init__(self, records):
    self.records = records

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    if multiprocessing.parent_process() is not None:  # a worker process
      assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
      assert cv2.getNumThreads() == 1, "worker start-up did not run"
      assert "tensorflow" not in sys.modules
    return self.records[i]


def _take(it, n):
  try:
    return [next(it) for _ in range(n)]
  finally:
    it.close()


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def _train(data, *, start_step=0, num_workers=0, seed=0, **kw):
  source, labels = data
  return input_pipeline.train_batches(
      source, labels, _config(num_workers), seed=seed, start_step=start_step,
      global_batch_size=GLOBAL_BATCH, **kw)


def test_train_batches_are_pk(data):
  _, labels = data
  spe = input_pipeline.steps_per_epoch(len(labels), GLOBAL_BATCH)
  batches = _take(_train(data), 2 * spe + 1)  # crosses two epoch boundaries
  erased = 0
  for b in batches:
    assert set(b) == {"image", "erase", "label"}
    assert b["image"].shape == (GLOBAL_BATCH, 32, 32, 3)
    # uint8 to the device: the step normalises and erases (preprocess.py).
    assert b["image"].dtype == np.uint8 and b["label"].dtype == np.int32
    ids = b["label"].reshape(P, K)
    assert (ids == ids[:, :1]).all() and len(set(ids[:, 0])) == P
    assert b["erase"].shape == (GLOBAL_BATCH, 4) and b["erase"].dtype == np.int32
    top, left, h, w = b["erase"].T
    none = h == 0
    assert (b["erase"][none] == 0).all()
    assert (top + h <= 32).all() and (left + w <= 32).all() and (w[~none] > 0).all()
    erased += int(np.sum(~none))
  assert 0 < erased < len(batches) * GLOBAL_BATCH  # erase_prob 0.5


def test_labels_come_from_the_label_array(data):
  # The records' own "label" field is never read: relabel the array and the
  # batch labels follow it.
  source, labels = data
  shifted = input_pipeline.train_batches(
      source, labels + 100, _config(), seed=0, start_step=0,
      global_batch_size=GLOBAL_BATCH)
  a, b = _take(_train(data), 3), _take(shifted, 3)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["label"] + 100, y["label"])
    np.testing.assert_array_equal(x["image"], y["image"])


def test_dataset_balanced_batches_only_with_several_datasets(data):
  """input.balance_datasets with each record's dataset: identities 0-5 and 6-10 as two
  datasets give every batch P/2 of each, the first dataset's rows first; with the flag
  off, or with one dataset, the batches are the plain sampler's."""
  source, labels = data
  domains = (labels >= 6).astype(np.int64)

  def take(balance, domains):
    config = _config()
    config.balance_datasets = balance
    return _take(input_pipeline.train_batches(
        source, labels, config, seed=0, start_step=0, global_batch_size=GLOBAL_BATCH,
        domains=domains), 4)

  plain = _take(_train(data), 4)
  half = P // 2 * K
  for b in take(True, domains):
    np.testing.assert_array_equal(b["label"] >= 6, [False] * half + [True] * half)
  _assert_same(take(False, domains), plain)
  _assert_same(take(True, np.zeros_like(labels)), plain)


def test_seed_changes_batches(data):
  a, b = _take(_train(data, seed=0), 2), _take(_train(data, seed=1), 2)
  assert not np.array_equal(a[0]["image"], b[0]["image"])


def test_resume_equals_uninterrupted(data):
  _, labels = data
  spe = input_pipeline.steps_per_epoch(len(labels), GLOBAL_BATCH)
  full = _take(_train(data), 2 * spe + 2)
  for s in (1, spe - 1, spe + 1):
    resumed = _take(_train(data, start_step=s), 3)
    _assert_same(resumed, full[s:s + 3])


def test_two_workers_match_in_process(data):
  # Started at step 2, so this also checks that resuming does not depend on
  # the worker count.
  in_process = _take(_train(data), 7)[2:]
  checked = (_WorkerCheckingSource(data[0]), data[1])
  workers = _take(_train(checked, start_step=2, num_workers=2), 5)
  _assert_same(workers, in_process)


def test_worker_batch_memory_is_reused_only_after_release(data):
  # Workers recycle a batch's shared memory once the main process drops the batch:
  # batches still held must keep their contents while later ones reuse memory.
  want = _take(_train(data), 24)
  it = _train(data, num_workers=2)
  try:
    held = {}
    for step in range(24):
      batch = next(it)
      if step % 5 == 0:
        held[step] = batch
      else:
        _assert_same([batch], [want[step]])
      del batch
  finally:
    it.close()
  assert len(held) == 5
  for step, batch in held.items():
    _assert_same([batch], [want[step]])


def test_two_processes_make_the_global_batch(data):
  whole = _take(_train(data), 4)
  parts = [_take(_train(data, process_index=i, process_count=2), 4)
           for i in range(2)]
  for step, batch in enumerate(whole):
    for key in batch:
      assert parts[0][step][key].shape[0] == GLOBAL_BATCH // 2
      np.testing.assert_array_equal(
          np.concatenate([parts[0][step][key], parts[1][step][key]]),
          batch[key])


def test_train_config_errors(data):
  source, labels = data
  with pytest.raises(ValueError, match="global_batch_size=6 .* 4 \\* 2 = 8"):
    input_pipeline.train_batches(source, labels, _config(), seed=0,
                                 start_step=0, global_batch_size=6)
  with pytest.raises(ValueError, match="not divisible by process_count=3"):
    input_pipeline.train_batches(source, labels, _config(), seed=0,
                                 start_step=0, global_batch_size=8,
                                 process_index=0, process_count=3)
  with pytest.raises(ValueError, match="labels has 3 entries"):
    input_pipeline.train_batches(source, labels[:3], _config(), seed=0,
                                 start_step=0, global_batch_size=8)


@pytest.mark.parametrize("batch_size", [8, 16, 45])
def test_eval_visits_every_record_once_and_masks_padding(data, batch_size):
  source, _ = data
  n = len(source)
  transform = augment.TestTransform.from_config(_config())
  batches = list(input_pipeline.eval_batches(source, _config(),
                                             batch_size=batch_size))
  assert len(batches) == -(-n // batch_size)
  index = np.concatenate([b["index"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(index[mask], np.arange(n))
  assert mask.sum() == n and (index[~mask] == -1).all()
  for b in batches:
    assert b["image"].shape == (batch_size, 32, 32, 3)
    assert b["mask"].dtype == np.bool_ and b["index"].dtype == np.int32
    for img, m, i in zip(b["image"], b["mask"], b["index"]):
      want = transform(source[i]["image"]) if m else np.zeros_like(img)
      np.testing.assert_array_equal(img, want)


def test_eval_two_processes_split_each_global_batch(data):
  source, _ = data
  whole = list(input_pipeline.eval_batches(source, _config(), batch_size=16))
  parts = [list(input_pipeline.eval_batches(
      source, _config(), batch_size=16, process_index=i, process_count=2))
           for i in range(2)]
  assert len(parts[0]) == len(parts[1]) == len(whole)
  for step, batch in enumerate(whole):
    for key in batch:
      np.testing.assert_array_equal(
          np.concatenate([parts[0][step][key], parts[1][step][key]]),
          batch[key])


def test_eval_with_workers_matches_in_process(data):
  source, _ = data
  in_process = list(input_pipeline.eval_batches(source, _config(),
                                                batch_size=16))
  workers = list(input_pipeline.eval_batches(source, _config(num_workers=2),
                                             batch_size=16))
  _assert_same(workers, in_process)


def test_device_put_batch_shards_over_the_mesh():
  devices = np.array(jax.devices())
  assert len(devices) == 8  # tests/conftest.py
  mesh = Mesh(devices, ("data",))
  sharding = NamedSharding(mesh, PartitionSpec("data"))
  batch = {"image": np.random.default_rng(0).random((16, 4, 4, 3), np.float32),
           "label": np.arange(16, dtype=np.int32)}
  out = input_pipeline.device_put_batch(batch, sharding)
  for key, x in out.items():
    assert isinstance(x, jax.Array) and x.sharding == sharding
    np.testing.assert_array_equal(np.asarray(x), batch[key])
    # Each device holds its own 2 rows of the batch.
    for shard in x.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data),
                                    batch[key][shard.index])
      assert shard.data.shape[0] == 2


# A training process with grain workers, run as its own program: "close" stops the
# workers and exits, "hold" prints its pid's children and waits to be killed.
_WORKERS_SCRIPT = """
import io, sys, time
import numpy as np
from PIL import Image
from absl import flags
from configs import common
from musp_jax.data import input_pipeline

def main():
  flags.FLAGS.mark_as_parsed()
  records, rng = [], np.random.default_rng(0)
  for i in range(16):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 30, 3), np.uint8)).save(buf, "JPEG")
    records.append({"image": buf.getvalue()})
  config = common.get_config().input
  config.image_size, config.num_ids, config.num_instances = (32, 32), 2, 2
  config.num_workers = 2
  it = input_pipeline.train_batches(records, np.arange(16) // 2, config, seed=0,
                                    start_step=0, global_batch_size=4)
  for _ in range(5):
    next(it)
  if sys.argv[1] == "close":
    it.close()
    return
  print("ready", flush=True)
  time.sleep(600)

if __name__ == "__main__":
  main()
"""


def _run_workers_script(tmp_path, mode, **kw):
  script = tmp_path / "workers.py"
  script.write_text(_WORKERS_SCRIPT)
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable, str(script), mode], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_closing_frees_the_shared_memory_of_every_batch(tmp_path):
  """Batches made ahead are freed too: multiprocessing's resource tracker, which
  reports at exit what was never freed, finds nothing."""
  proc = _run_workers_script(tmp_path, "close")
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err
  assert "leaked" not in err, err


def _children(pid: int) -> list[int]:
  """Live (not zombie) processes whose parent is `pid`."""
  out = []
  for entry in os.listdir("/proc"):
    try:
      stat = pathlib.Path(f"/proc/{entry}/stat").read_text()
    except (OSError, ValueError):
      continue
    fields = stat.rsplit(")", 1)[-1].split()
    if entry.isdigit() and fields[1] == str(pid) and fields[0] != "Z":
      out.append(int(entry))
  return out


def _alive(pid: int) -> bool:
  try:
    return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
  except OSError:
    return False


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc")
def test_workers_end_when_the_training_process_is_killed(tmp_path):
  """SIGKILL (the OOM killer's) leaves the workers orphans; they end on their own."""
  proc = _run_workers_script(tmp_path, "hold")
  assert proc.stdout.readline().strip() == "ready"
  workers = _children(proc.pid)
  assert len(workers) >= 2  # two workers (and multiprocessing's resource tracker)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  deadline = time.time() + 20
  while any(map(_alive, workers)) and time.time() < deadline:
    time.sleep(0.1)
  assert not any(map(_alive, workers))
