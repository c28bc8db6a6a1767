"""Data-parallel scaling of the MUSP train step over 1, 2, 4, 8 devices.

    python scripts/scaling.py --out_dir workdirs/scaling                 # GPUs / TPUs
    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        python scripts/scaling.py --out_dir workdirs/scaling_cpu          # fake CPU devices
    python -m musp_jax.distributed --num_processes 2 -- \\
        python scripts/scaling.py --distributed --out_dir workdirs/scaling_mh   # multi-host

Weak scaling keeps --per_device_batch fixed (the global batch grows with the
devices); strong scaling keeps --global_batch fixed. For each device count the
script builds a 1-D "data" mesh over the first n devices and jits the
project's train step with step.jit_step, exactly as training does. All
configurations are compiled first, then take turns for --reps rounds; the
figure is the median. Efficiency = throughput(n) / (n * throughput(1)).

Writes <out_dir>/scaling.md (markdown table) and <out_dir>/scaling.png.
Fake CPU devices share the machine's real cores, so on a CPU their
"scaling" measures the overhead of partitioning, not a speed-up.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import time

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import common
from musp_jax.core import optim
from musp_jax.core import state as state_lib
from musp_jax.core import step as step_lib
from musp_jax.models import build_model
from musp_jax.runtime import process


def _mesh(n: int) -> jax.sharding.Mesh:
  return jax.sharding.Mesh(np.array(jax.devices()[:n]), ("data",),
                           axis_types=(jax.sharding.AxisType.Auto,))


def _setup(c, num_classes: int, n: int, batch: int, image_size: int, seed: int = 0):
  """State, jitted step and a device batch for an n-device mesh."""
  mesh = _mesh(n)
  model = build_model(c.model, num_classes)
  tx = optim.make_optimizer(c.optim, 100)
  state, state_sharding = state_lib.create_train_state(
      model, tx, (image_size, image_size), seed=seed, mesh=mesh)
  batch_sharding = NamedSharding(mesh, P("data"))
  step = step_lib.jit_step(model=model, tx=tx, loss_config=c.loss, input_config=c.input,
                           mesh=mesh, state_sharding=state_sharding)
  rng = np.random.default_rng(seed)
  per_process = batch // jax.process_count()
  rows = slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
  host = step_lib.random_batch(rng, batch, (image_size, image_size), num_classes)
  device_batch = {k: jax.make_array_from_process_local_data(batch_sharding, v[rows], v.shape)
                  for k, v in host.items()}
  return [state, step, device_batch]


def add_efficiency(rows: list[dict]) -> list[dict]:
  """efficiency = img_s(n) / (n * img_s(1)) within each mode (NaN without n=1)."""
  for r in rows:
    base = next((b for b in rows if b["mode"] == r["mode"] and b["devices"] == 1), None)
    r["efficiency"] = r["img_s"] / (r["devices"] * base["img_s"]) if base else float("nan")
  return rows


def _plot(rows: list[dict], path: pathlib.Path, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(10, 4))
  for mode, marker in (("weak", "o"), ("strong", "s")):
    sel = [r for r in rows if r["mode"] == mode]
    if not sel:
      continue
    n = [r["devices"] for r in sel]
    ax_t.plot(n, [r["img_s"] for r in sel], marker=marker, label=mode)
    ax_t.plot(n, [sel[0]["img_s"] * d / sel[0]["devices"] for d in n], ls=":", c="gray")
    ax_e.plot(n, [100 * r["efficiency"] for r in sel], marker=marker, label=mode)
  ax_t.set(xlabel="devices", ylabel="images / s", xscale="log", xticks=[1, 2, 4, 8],
           xticklabels=["1", "2", "4", "8"], title="throughput (dotted: linear)")
  ax_e.axhline(90, ls="--", c="gray", lw=1)
  ax_e.set(xlabel="devices", ylabel="efficiency (%)", xscale="log", xticks=[1, 2, 4, 8],
           xticklabels=["1", "2", "4", "8"], ylim=(0, 110), title="efficiency (goal 90%)")
  for ax in (ax_t, ax_e):
    ax.legend()
    ax.grid(alpha=0.3)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--devices", default="1,2,4,8")
  parser.add_argument("--modes", default="weak,strong")
  parser.add_argument("--per_device_batch", type=int, default=None,
                      help="weak scaling (default 64 on accelerators, 4 on CPU)")
  parser.add_argument("--global_batch", type=int, default=None,
                      help="strong scaling (default 256 on accelerators, 32 on CPU)")
  parser.add_argument("--image_size", type=int, default=None,
                      help="default 256 on accelerators, 64 on CPU")
  parser.add_argument("--depth", type=int, default=None,
                      help="ResNet depth (default 50 on accelerators, 18 on CPU)")
  parser.add_argument("--head", default="musp", choices=("musp", "baseline"))
  parser.add_argument("--dtype", default=None, help="default bfloat16 on accelerators")
  parser.add_argument("--conv_impl", default="auto")
  parser.add_argument("--num_classes", type=int, default=576)
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--steps", type=int, default=2, help="steps per timed turn")
  parser.add_argument("--distributed", action="store_true",
                      help="multi-process: jax.distributed via musp_jax.runtime.process")
  parser.add_argument("--out_dir", default="workdirs/scaling")
  args = parser.parse_args()

  if args.distributed:
    process.initialize_distributed()
  cpu = jax.default_backend() == "cpu"
  per_device = args.per_device_batch or (4 if cpu else 64)
  global_batch = args.global_batch or (32 if cpu else 256)
  image_size = args.image_size or (64 if cpu else 256)
  depth = args.depth or (18 if cpu else 50)
  dtype = args.dtype or ("float32" if cpu else "bfloat16")

  c = common.get_config()
  c.model.depth = depth
  c.model.head = args.head
  c.model.dtype = dtype
  c.model.conv_impl = args.conv_impl

  counts = [n for n in map(int, args.devices.split(",")) if n <= jax.device_count()]
  if jax.process_count() > 1:
    # A sub-mesh must hold devices of every process; measure the whole job.
    counts = [jax.device_count()]
  modes = args.modes.split(",")
  configs = []
  for mode in modes:
    for n in counts:
      batch = per_device * n if mode == "weak" else global_batch
      if batch % n or batch % (4 * jax.process_count()):
        print(f"skip {mode} n={n}: batch {batch} does not split over {n} devices")
        continue
      t0 = time.perf_counter()
      entry = _setup(c, args.num_classes, n, batch, image_size)
      state, step, device_batch = entry
      state, metrics = step(state, device_batch)  # compile + warm-up
      state, metrics = step(state, device_batch)
      float(metrics["loss"])
      entry[0] = state
      configs.append((mode, n, batch, entry))
      print(f"{mode:6s} {n} device(s), batch {batch}: ready in "
            f"{time.perf_counter() - t0:.0f}s", flush=True)

  times = {(m, n): [] for m, n, _, _ in configs}
  for _ in range(args.reps):
    for mode, n, _, entry in configs:
      state, step, device_batch = entry
      t = time.perf_counter()
      for _ in range(args.steps):
        state, metrics = step(state, device_batch)
      jax.block_until_ready(state.step)
      times[mode, n].append((time.perf_counter() - t) / args.steps)
      entry[0] = state

  device = jax.devices()[0]
  kind = f"{jax.device_count()} x {device.device_kind} ({device.platform})"
  if cpu:
    kind += f", {os.cpu_count()} real cores"
  rows = []
  for mode, n, batch, _ in configs:
    t = statistics.median(times[mode, n])
    rows.append({"mode": mode, "devices": n, "batch": batch, "ms": 1e3 * t,
                 "img_s": batch / t})
  add_efficiency(rows)

  title = (f"MUSP train step, ResNet-{depth} ({args.head}), {image_size}px, {dtype}, "
           f"conv_impl {args.conv_impl}; {kind}; {jax.process_count()} process(es)")
  lines = [f"**{title}**", "",
           "| mode | devices | global batch | ms/step | images/s | efficiency |",
           "|---|---:|---:|---:|---:|---:|"]
  lines += [f"| {r['mode']} | {r['devices']} | {r['batch']} | {r['ms']:.0f} | "
            f"{r['img_s']:.1f} | {100 * r['efficiency']:.0f}% |" for r in rows]
  if cpu and jax.device_count() > (os.cpu_count() or 1):
    lines += ["", f"Note: {jax.device_count()} fake CPU devices share {os.cpu_count()} real "
              "cores, so these figures measure the overhead of partitioning the step, "
              "not a speed-up; scaling is meaningful on GPUs/TPUs."]
  weak = [r for r in rows if r["mode"] == "weak" and r["devices"] == max(counts)]
  if weak and not cpu:
    lines += ["", f"Goal: weak-scaling efficiency >= 90% at {weak[0]['devices']} devices: "
              f"{100 * weak[0]['efficiency']:.0f}%."]
  table = "\n".join(lines)
  print("\n" + table)
  if jax.process_index() == 0:
    out = pathlib.Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.md").write_text(table + "\n")
    _plot(rows, out / "scaling.png", title)
    print(f"\nwrote {out / 'scaling.md'} and {out / 'scaling.png'}")


if __name__ == "__main__":
  main()
