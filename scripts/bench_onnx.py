"""ONNX export at the paper's size: parity with JAX, conversion time, runtime speed.

    .venv/bin/python scripts/bench_onnx.py                    # ResNet-50, 256 px, n = 5
    .venv/bin/python scripts/bench_onnx.py --depth 18 --size 64

For the MUSP head and the baseline, each with random weights (parity does not
depend on training): `export.export_onnx` (the `--format onnx` path), then, on
the same random uint8 images, onnxruntime (CPU) against the jitted JAX serving
function:
  1. conversion time and model size;
  2. the largest relative difference per feature vector (and per image's
     areas), over --images images in one batch;
  3. median latency of a --batch batch in onnxruntime and in JAX, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np
import onnxruntime

from configs import common
from musp_jax import export
from musp_jax.serving import inference
from musp_jax.core import state
from musp_jax.models import build_model


def _random_model(head: str, depth: int, size: int) -> inference.LoadedModel:
  config = common.get_config()
  config.model.head, config.model.depth = head, depth
  config.input.image_size = (size, size)
  model = build_model(config.model, num_classes=576)
  variables = state.init_variables(model, (size, size), 0)
  return inference.LoadedModel(config=config, model=model, variables=variables, step=0,
                               source="random weights", signature=json.dumps({}))


def _median_seconds(fn, repeats: int) -> float:
  fn()  # warm-up (compilation, allocation)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--depth", type=int, default=50)
  parser.add_argument("--size", type=int, default=256)
  parser.add_argument("--images", type=int, default=8, help="Images for the parity check.")
  parser.add_argument("--batch", type=int, default=8, help="Batch for the latency.")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  hw = (args.size, args.size)
  for head in ("musp", "baseline"):
    loaded = _random_model(head, args.depth, args.size)
    start = time.perf_counter()
    serialized, _ = export.export_onnx(loaded)
    convert_s = time.perf_counter() - start
    direct = jax.jit(export.serving_fn(loaded.model, loaded.variables, loaded.config,
                                       input_hw=hw))
    parity = export.onnx_parity(serialized, direct, hw, batch_sizes=(args.images,))
    session = onnxruntime.InferenceSession(serialized, providers=["CPUExecutionProvider"])
    images = np.random.default_rng(1).integers(0, 256, (args.batch, *hw, 3), np.uint8)
    ort_s = _median_seconds(lambda: session.run(None, {"images": images}), args.repeats)
    jax_s = _median_seconds(lambda: jax.block_until_ready(direct(images)), args.repeats)
    print(f"{head:8s} ResNet-{args.depth} {args.size}px: converted in {convert_s:.1f} s, "
          f"{len(serialized) / 2**20:.0f} MiB; max relative difference "
          f"{parity['feats']:.1e} (feats), {parity['areas']:.1e} (areas) over "
          f"{args.images} images; batch {args.batch}: onnxruntime {ort_s:.2f} s, "
          f"JAX {jax_s:.2f} s (onnxruntime takes {ort_s / jax_s:.2f}x JAX's time)", flush=True)


if __name__ == "__main__":
  main()
