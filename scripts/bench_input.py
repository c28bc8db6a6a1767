"""Input pipeline throughput: decode + augment per core, and grain batches.

    python scripts/bench_input.py --workers 1,2 --step_time_ms 40

Writes VeRi-like JPEGs (sides 100-500 px, smooth content plus sensor noise,
quality 90) with PIL, then serves their bytes from memory as a random-access
source, so decoding sees real JPEGs and neither figure below pays for file
reads. Prints, measured in turns in the same run (so a shared machine's load
drifts hit every figure alike):
  1. single-core images per CPU-second of the train transform (OpenCV:
     decode, translate, flip, erase box; uint8 out) next to a PIL
     implementation of the official transform (which also normalises and
     erases on the host);
  2. images per CPU-second (main process + grain workers) of
     `input_pipeline.train_batches` (P=16, K=4, 256x256: uint8 batches with
     erase boxes, in the main process) for each worker count, and its ratio
     to 1. (goal: >= 900 and >= 85%); copying the batch to the device is not
     counted;
  3. the share of each train step the accelerator would wait for data,
     given --step_time_ms (or, without it, the step time of a tiny jitted
     CNN on the default JAX backend measured here).
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import pathlib
import tempfile
import time

import cv2
import numpy as np
from PIL import Image

from configs import common
from musp_jax.data import augment
from musp_jax.data import input_pipeline
from musp_jax.runtime import process


def write_jpegs(folder: str, n: int, seed: int = 0) -> list[str]:
  rng = np.random.default_rng(seed)
  paths = []
  for i in range(n):
    w, h = rng.integers(100, 501, size=2)
    coarse = rng.integers(0, 256, (h // 16 + 2, w // 16 + 2, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC))
    noisy = smooth.astype(np.int16) + rng.integers(-8, 9, smooth.shape)
    path = os.path.join(folder, f"{i:05d}.jpg")
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path, quality=90)
    paths.append(path)
  return paths


def pil_reference(data: bytes, rng: np.random.Generator, size=(256, 256)):
  """The official transform's ops with PIL (resize 1.125x + crop, flip,
  normalise, erase), as the baseline for the per-core figure."""
  img = Image.open(io.BytesIO(data)).convert("RGB")
  h, w = size
  if rng.random() < 0.5:
    bw, bh = round(w * 1.125), round(h * 1.125)
    x, y = round(rng.uniform(0, bw - w)), round(rng.uniform(0, bh - h))
    img = img.resize((bw, bh), Image.BILINEAR).crop((x, y, x + w, y + h))
  else:
    img = img.resize((w, h), Image.BILINEAR)
  if rng.random() < 0.5:
    img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  x = np.asarray(img, np.float32) / 127.5 - 1.0
  if rng.random() < 0.5:
    box = augment.erase_box(rng, h, w, area=(0.02, 0.4), min_aspect=0.3)
    if box is not None:
      t, l, bh, bw = box
      x[t:t + bh, l:l + bw] = (0.4914, 0.4822, 0.4465)
  return x


class _Turns:
  """Accumulates (images, CPU seconds, wall seconds) over the turns of one contender."""

  def __init__(self):
    self.images, self.cpu, self.wall = 0, 0.0, 0.0

  def add(self, images: int, cpu: float, wall: float) -> None:
    self.images += images
    self.cpu += cpu
    self.wall += wall

  @property
  def per_cpu(self) -> float:
    return self.images / self.cpu

  @property
  def per_wall(self) -> float:
    return self.images / self.wall


def transform_turn(fn, blobs, turn: int, turns: _Turns) -> None:
  """One pass of `fn` over the images in this process (one core, as a worker)."""
  wall, cpu = time.perf_counter(), time.process_time()
  for i, data in enumerate(blobs):
    fn(data, np.random.default_rng([turn, i]))
  turns.add(len(blobs), time.process_time() - cpu, time.perf_counter() - wall)


def _cpu_seconds(pids) -> float:
  """CPU time (user + system) of `pids` (Linux /proc)."""
  total = 0.0
  for pid in pids:
    try:
      fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1]
    except OSError:
      continue
    utime, stime = fields.split()[11:13]
    total += (int(utime) + int(stime)) / os.sysconf("SC_CLK_TCK")
  return total


class Pipeline:
  """A started `train_batches` iterator and the worker processes it runs on.

  Its workers work ahead (grain's buffers) while other contenders take their turns,
  so their CPU time is counted over the whole run, from full buffers (after start-up)
  to full buffers (at `finish`): exactly the work of the batches taken. The main
  process's CPU time counts during the pipeline's turns, and wall time per turn after
  the buffered batches have been taken, at the steady rate.
  """

  def __init__(self, source, labels, input_config, workers: int, warmup: int):
    before = set(multiprocessing.active_children())
    input_config.num_workers = workers
    self.it = input_pipeline.train_batches(
        source, labels, input_config, seed=0, start_step=0,
        global_batch_size=input_config.num_ids * input_config.num_instances)
    for _ in range(warmup):  # worker start-up and first epoch arrangement
      next(self.it)
    self.pids = [p.pid for p in set(multiprocessing.active_children()) - before]
    # Batches a worker holds ready: its output buffer and its read-ahead.
    self.buffered = workers * (2 * int(input_config.prefetch_buffer) + 2)
    self.images = self.timed_images = 0
    self.timed_wall = self.main_cpu = 0.0
    self._wait_idle()
    self.cpu0 = _cpu_seconds(self.pids)

  def _take(self, batches: int) -> int:
    n = sum(next(self.it)["image"].shape[0] for _ in range(batches))
    self.images += n
    return n

  def turn(self, batches: int) -> None:
    main_cpu = time.process_time()
    self._take(self.buffered)
    wall = time.perf_counter()
    self.timed_images += self._take(batches)
    self.timed_wall += time.perf_counter() - wall
    self.main_cpu += time.process_time() - main_cpu

  def finish(self) -> tuple[float, float]:
    """(images per CPU-second over the run, images per wall-second when timed)."""
    self._wait_idle()
    cpu = _cpu_seconds(self.pids) - self.cpu0 + self.main_cpu
    self.it.close()
    return self.images / cpu, self.timed_images / self.timed_wall

  def _wait_idle(self, poll_s: float = 0.1, polls: int = 3, timeout_s: float = 60) -> None:
    """Returns once the workers have used no CPU for `polls` polls in a row."""
    quiet, last, start = 0, _cpu_seconds(self.pids), time.perf_counter()
    while quiet < polls and time.perf_counter() - start < timeout_s:
      time.sleep(poll_s)
      now = _cpu_seconds(self.pids)
      quiet = quiet + 1 if now - last < 0.005 else 0
      last = now


def tiny_model_step_ms(batch_shape) -> float:
  """Step time of a small jitted CNN (forward + backward + SGD)."""
  import jax
  import jax.numpy as jnp
  from flax import linen as nn

  class Tiny(nn.Module):

    @nn.compact
    def __call__(self, x):
      for ch in (32, 64, 128):
        x = nn.relu(nn.Conv(ch, (3, 3), strides=2)(x))
      return nn.Dense(10)(x.mean((1, 2)))

  model = Tiny()
  x = jnp.zeros(batch_shape, jnp.float32)
  y = jnp.zeros(batch_shape[0], jnp.int32)
  params = model.init(jax.random.key(0), x)

  @jax.jit
  def step(params, x, y):
    def loss(p):
      logits = model.apply(p, x)
      return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1).mean()
    grads = jax.grad(loss)(params)
    return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)

  params = jax.block_until_ready(step(params, x, y))
  start = time.perf_counter()
  for _ in range(3):
    params = step(params, x, y)
  jax.block_until_ready(params)
  return (time.perf_counter() - start) / 3 * 1e3


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_images", type=int, default=256)
  parser.add_argument("--workers", default="",
                      help="comma-separated worker counts (default 1..cores)")
  parser.add_argument("--turns", type=int, default=4,
                      help="rounds; each contender takes one turn per round")
  parser.add_argument("--batches", type=int, default=8,
                      help="batches per pipeline turn")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--step_time_ms", type=float, default=None)
  args = parser.parse_args()
  process.setup()  # absl flags parsed (grain reads them), quiet library logs

  cores = os.cpu_count() or 1
  workers = ([int(w) for w in args.workers.split(",")] if args.workers
             else list(range(1, cores + 1)))
  cfg = common.get_config().input
  batch = cfg.num_ids * cfg.num_instances
  print(f"cores={cores} load={os.getloadavg()[0]:.1f} image_size={tuple(cfg.image_size)} "
        f"batch={batch} (P={cfg.num_ids} x K={cfg.num_instances})")

  with tempfile.TemporaryDirectory() as folder:
    paths = write_jpegs(folder, args.num_images)
    blobs = [pathlib.Path(p).read_bytes() for p in paths]
    sides = [Image.open(p).size for p in paths]
    print(f"{len(blobs)} JPEGs, mean {np.mean(sides, 0).round()} px (w, h), "
          f"{sum(map(len, blobs)) / len(blobs) / 1024:.0f} KiB each")
  source = [{"image": b} for b in blobs]
  labels = np.arange(len(source)) % (len(source) // 8)  # ~8 images per id

  if args.step_time_ms is None:
    step_ms = tiny_model_step_ms((batch, *cfg.image_size, 3))
    step_note = f"tiny CNN measured here {step_ms:.1f} ms (pass --step_time_ms for the real model)"
  else:
    step_ms = args.step_time_ms
    step_note = f"{step_ms:.1f} ms (given)"

  cv2.setNumThreads(1)  # one core, as in a grain worker
  transform = augment.TrainTransform.from_config(cfg)
  pipelines = {w: Pipeline(source, labels, cfg, w, args.warmup) for w in workers}
  ours, pil = _Turns(), _Turns()
  try:
    for turn in range(args.turns):
      transform_turn(transform, blobs, turn, ours)
      transform_turn(pil_reference, blobs, turn, pil)
      for pipeline in pipelines.values():
        pipeline.turn(args.batches)
    through = {w: pipeline.finish() for w, pipeline in pipelines.items()}
  finally:
    for pipeline in pipelines.values():
      pipeline.it.close()

  print(f"\ndecode+augment on 1 core, {args.turns} turns x {len(blobs)} images:")
  print(f"  opencv (ours, uint8 + erase box): {ours.per_cpu:5.0f} img per CPU-second, "
        f"{ours.per_wall:5.0f} img/s wall")
  print(f"  PIL, official transform:          {pil.per_cpu:5.0f} img per CPU-second, "
        f"{pil.per_wall:5.0f} img/s wall  (ours/PIL {ours.per_cpu / pil.per_cpu:.2f}x)")
  print(f"\ngrain pipeline, {args.turns} turns x {args.batches} batches; step time: {step_note}")
  # img/s/cpu: images per CPU-second of the workers and of the main process
  # while it takes batches, so the pipeline's cost per core shows even on a
  # machine shared with other jobs.
  print("workers  img/s wall  img/s/cpu  vs decode+augment  batch_ms  stall_share")
  for w in workers:
    per_cpu, per_wall = through[w]
    batch_ms = batch / per_wall * 1e3
    stall = max(0.0, batch_ms - step_ms) / max(batch_ms, step_ms)
    print(f"{w:7d}  {per_wall:10.0f}  {per_cpu:9.0f}  {per_cpu / ours.per_cpu:17.0%}"
          f"  {batch_ms:8.1f}  {stall:11.1%}")
  best = max(workers, key=lambda w: through[w][0])
  print(f"\nGoal: >= 900 img per CPU-second through grain workers and >= 85% of "
        f"decode+augment alone: {best} worker(s) {through[best][0]:.0f} "
        f"({through[best][0] / ours.per_cpu:.0%}).")


if __name__ == "__main__":
  main()
