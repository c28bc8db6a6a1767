"""Input pipeline throughput: decode + augment per core, and grain batches.

    python scripts/bench_input.py --workers 1,2 --step_time_ms 40

Writes VeRi-like JPEGs (sides 100-500 px, smooth content plus sensor noise,
quality 90) with PIL into a temporary folder and reads them back as a
random-access source, so decoding sees real JPEG files. Prints:
  1. single-core images/s of the train transform (OpenCV) next to a PIL
     implementation of the same ops measured in the same run (the ratio is
     the figure to compare across machines);
  2. images/s of `input_pipeline.train_batches` (P=16, K=4, 256x256) for
     each worker count, after the workers have started;
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

from absl import flags
import cv2
import numpy as np
from PIL import Image

from configs import common
from musp_jax import augment
from musp_jax import input_pipeline


class FileSource:
  """Random-access source over JPEG files, shaped like datasets.load_split."""

  def __init__(self, paths: list[str]):
    self.paths = paths

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, i: int) -> dict:
    return {"image": pathlib.Path(self.paths[i]).read_bytes()}


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


def per_core(source: FileSource, input_config, repeats: int):
  """images/s of (ours, PIL) by wall clock and by this process's CPU time.

  CPU time gives the per-core rate even on a machine shared with other jobs.
  """
  transform = augment.TrainTransform.from_config(input_config)
  blobs = [source[i]["image"] for i in range(len(source))]
  rates = []
  for fn in (transform, pil_reference):
    fn(blobs[0], np.random.default_rng(0))  # warm-up
    wall, cpu = time.perf_counter(), time.process_time()
    for r in range(repeats):
      for i, data in enumerate(blobs):
        fn(data, np.random.default_rng([r, i]))
    n = repeats * len(blobs)
    rates.append((n / (time.perf_counter() - wall),
                  n / (time.process_time() - cpu)))
  return rates


def _cpu_seconds(pids) -> float:
  """CPU time (user + system) of this process and of `pids` (Linux /proc)."""
  total = time.process_time()
  for pid in pids:
    try:
      fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1]
    except OSError:
      continue
    utime, stime = fields.split()[11:13]
    total += (int(utime) + int(stime)) / os.sysconf("SC_CLK_TCK")
  return total


def pipeline_rate(source, labels, input_config, workers: int, batches: int,
                  warmup: int) -> tuple[float, float]:
  """(images/s wall, images per CPU-second of main process + workers)."""
  input_config.num_workers = workers
  it = input_pipeline.train_batches(
      source, labels, input_config, seed=0, start_step=0,
      global_batch_size=input_config.num_ids * input_config.num_instances)
  try:
    for _ in range(warmup):  # worker start-up and first epoch arrangement
      next(it)
    pids = [p.pid for p in multiprocessing.active_children()]
    wall, cpu = time.perf_counter(), _cpu_seconds(pids)
    n = 0
    for _ in range(batches):
      n += next(it)["image"].shape[0]
    return (n / (time.perf_counter() - wall),
            n / (_cpu_seconds(pids) - cpu))
  finally:
    it.close()


def tiny_model_step_ms(batch_shape) -> float:
  """Step time of a small jitted CNN (forward + backward + SGD)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import linen as nn  # pylint: disable=g-import-not-at-top

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
  parser.add_argument("--num_images", type=int, default=512)
  parser.add_argument("--workers", default="",
                      help="comma-separated worker counts (default 0..cores)")
  parser.add_argument("--batches", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=2,
                      help="passes over the images for the per-core figure")
  parser.add_argument("--step_time_ms", type=float, default=None)
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()  # grain reads absl flags

  cores = os.cpu_count() or 1
  workers = ([int(w) for w in args.workers.split(",")] if args.workers
             else list(range(0, cores + 1)))
  cfg = common.get_config().input
  batch = cfg.num_ids * cfg.num_instances
  print(f"cores={cores} image_size={tuple(cfg.image_size)} batch={batch} "
        f"(P={cfg.num_ids} x K={cfg.num_instances})")

  with tempfile.TemporaryDirectory() as folder:
    source = FileSource(write_jpegs(folder, args.num_images))
    sides = [Image.open(p).size for p in source.paths]
    mb = sum(os.path.getsize(p) for p in source.paths) / 2**20
    print(f"{len(source)} JPEGs, mean {np.mean(sides, 0).round()} px (w, h), "
          f"{mb / len(source) * 1024:.0f} KiB each")
    cv2.setNumThreads(1)  # one core, as in a grain worker
    (ours_wall, ours_cpu), (pil_wall, pil_cpu) = per_core(
        source, cfg, args.repeats)
    print("decode+augment on 1 core (goal >= 1000 img/s per core):")
    print(f"  opencv (ours): {ours_cpu:5.0f} img/s per CPU-second, "
          f"{ours_wall:5.0f} img/s wall")
    print(f"  PIL reference: {pil_cpu:5.0f} img/s per CPU-second, "
          f"{pil_wall:5.0f} img/s wall")
    print(f"  ratio ours/PIL: {ours_cpu / pil_cpu:.2f}x (CPU time)")

    if args.step_time_ms is None:
      step_ms = tiny_model_step_ms((batch, *cfg.image_size, 3))
      print(f"step time: tiny CNN measured here {step_ms:.1f} ms "
            "(pass --step_time_ms for the real model)")
    else:
      step_ms = args.step_time_ms
      print(f"step time: {step_ms:.1f} ms (given)")

    labels = np.arange(len(source)) % (len(source) // 8)  # ~8 images per id
    # img/s/cpu: images per CPU-second of the main process and its workers
    # together (the prefetch threads of a busy main process included), so the
    # pipeline's cost per core shows even on a machine shared with other jobs.
    print("workers  img/s wall  img/s/cpu  batch_ms  stall_share")
    for w in workers:
      rate, per_cpu = pipeline_rate(source, labels, cfg, w, args.batches,
                                    args.warmup)
      batch_ms = batch / rate * 1e3
      stall = max(0.0, batch_ms - step_ms) / max(batch_ms, step_ms)
      print(f"{w:7d}  {rate:10.0f}  {per_cpu:9.0f}  {batch_ms:8.1f}"
            f"  {stall:11.1%}")


if __name__ == "__main__":
  main()
