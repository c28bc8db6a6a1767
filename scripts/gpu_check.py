"""The GPU check: one command on a GPU machine, every figure printed and written to --out.

    bash scripts/gpu_check.sh                # on the GPU machine (see the .sh for wheels)
    bash scripts/gpu_check.sh --dry-run      # on a CPU: tiny shapes, JAX_PLATFORMS=cpu

Needs jax (with CUDA), flax, optax, orbax-checkpoint, numpy, torch + torchvision and
ml-collections; never TensorFlow, tensorflow-datasets, grain or clu, and no download.
Parts, each a subprocess with its own time limit (a failure is reported, the next part
still runs, except after `platform`):
  platform  versions, devices; model.conv_impl="auto" resolves to XLA convolutions,
            lowered to cuDNN (GEMM convolutions, models/fast_conv.py, are for the CPU only)
  parity    MUSP ResNet-50 on the same weights and uint8 images on the GPU and on the
            CPU, float32 and bfloat16: features, areas and the train-mode loss
  train     scripts/bench_train.py: MUSP ResNet-50, 256 px, batch 64, the JAX step in
            float32 and bfloat16 against PyTorch eager and torch.compile
            (channels_last, autocast bfloat16) in the same run: img/s, ratios, peak
            GPU memory of each step
  eval      scripts/bench_eval.py at VERI-Wild large's shape (10,000 queries x 128,517
            gallery, 5 x 2048 features): distance + exact ranking wall time, its share
            of the GPU's measured float32 GEMM rate, the official pipeline beside it
Writes <out>/summary.json (every figure), <out>/summary.md and <out>/<part>.log.
Goals (issue 16): JAX >= 1.5x PyTorch eager; bfloat16 >= 3,000 img/s; VERI-Wild large
distance + exact ranking <= 2 s.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
PARTS = ("platform", "parity", "train", "eval")
GOAL_RATIO, GOAL_BF16_IMG_S, GOAL_EVAL_S = 1.5, 3000.0, 2.0

# Full size on the GPU; --dry-run: the same code paths at CPU-test size.
SHAPES = {
    False: {"depth": 50, "image_size": 256, "batch": 64, "num_classes": 576,
            "parity_images": 8,
            "contenders": "jax:auto,jax:auto:bfloat16,torch:eager_cl,torch:eager_cl:bfloat16,"
                          "torch:compile_cl,torch:compile_cl:bfloat16",
            "train_reps": 5, "train_steps": 5, "train_warmup": 3,
            "eval": ["--q", "10000", "--g", "128517", "--scale", "1", "--parts", "5",
                     "--channels", "2048", "--query_block", "1024", "--sections", "base"],
            # Worst cases, together under 10 minutes (a run takes about 6).
            "timeouts": {"platform": 45, "parity": 100, "train": 300, "eval": 120}},
    True: {"depth": 18, "image_size": 32, "batch": 8, "num_classes": 8,
           "parity_images": 8,
           # Each contender costs a process and a compilation: one of each framework
           # (torch.compile builds C++ kernels for minutes on a CPU; parity runs the
           # bfloat16 model here, tests/test_mixed_precision.py its step).
           "contenders": "jax:auto,torch:eager_cl",
           "train_reps": 1, "train_steps": 1, "train_warmup": 1,
           "eval": ["--q", "200", "--g", "1500", "--scale", "1", "--parts", "5",
                    "--channels", "64", "--query_block", "64", "--block_gallery", "512",
                    "--repeats", "1", "--sections", "base"],
           "timeouts": {"platform": 120, "parity": 240, "train": 300, "eval": 240}},
}


# ------------------------------------------------------------------------------ parts


def part_platform(args) -> dict:
  """Versions, devices, and what conv_impl="auto" becomes here."""
  import jax
  import jax.numpy as jnp
  import torch

  from musp_jax.models import fast_conv
  from musp_jax.models import resnet

  backend = jax.default_backend()
  if backend == "cpu" and not args.dry_run:
    raise SystemExit("JAX sees no GPU (backend cpu); on a CPU run --dry-run.")
  impl = fast_conv.resolve_conv_impl("auto")
  conv = resnet.conv(8, 3, 1, jnp.float32, "conv", impl=impl)
  x = jnp.zeros((1, 16, 16, 8), jnp.float32)
  variables = conv.init(jax.random.key(0), x)
  hlo = jax.jit(conv.apply).lower(variables, x).compile().as_text()
  info = {
      "jax": jax.__version__, "backend": backend,
      "devices": [f"{d.platform}:{d.device_kind}" for d in jax.devices()],
      "torch": torch.__version__, "torch_cuda": torch.cuda.is_available(),
      "conv_impl_auto": impl, "conv_lowered_to_cudnn": "cudnn" in hlo.lower(),
  }
  expected = "gemm" if backend == "cpu" else "xla"
  info["conv_impl_ok"] = impl == expected and (backend == "cpu" or info["conv_lowered_to_cudnn"])
  print(json.dumps(info, indent=2))
  return info


def part_parity(args) -> dict:
  """Features, areas and the train-mode loss of one model on the GPU and on the CPU."""
  import jax
  import numpy as np

  from configs import common
  from musp_jax.core import features
  from musp_jax.core import losses
  from musp_jax.core import preprocess
  from musp_jax.core import state
  from musp_jax.core import step
  from musp_jax.models import build_model

  shape = SHAPES[args.dry_run]
  size = (shape["image_size"],) * 2
  cpu, device = jax.devices("cpu")[0], jax.devices()[0]
  c = common.get_config()
  c.model.depth = shape["depth"]
  batch = step.random_batch(np.random.default_rng(0), shape["parity_images"], size,
                            shape["num_classes"])
  with jax.default_device(cpu):  # the same weights on both devices
    variables = state.init_variables(build_model(c.model, shape["num_classes"]), size, seed=0)
  out = {"device": device.device_kind, "images": int(batch["image"].shape[0])}
  for dtype in ("float32", "bfloat16"):
    c.model.dtype = dtype
    model = build_model(c.model, shape["num_classes"])

    def outputs(variables, batch, *, model):
      """Features and areas (eval mode) and the loss in train mode: one compilation."""
      feats, areas = features.embed(variables, batch["image"], model=model, flip=False,
                                    normalize=c.input.normalize)
      out, _ = model.apply(variables, preprocess.train_images(batch, c.input), train=True,
                           mutable=["batch_stats"])
      return feats, areas, losses.total_loss(out, batch["label"], c.loss)[0]

    jitted = jax.jit(functools.partial(outputs, model=model))
    got = {}
    for name, where in (("cpu", cpu), ("device", device)):
      f, a, loss = jitted(*jax.device_put((variables, batch), where))
      got[name] = (np.asarray(f), np.asarray(a), float(loss))
    (f0, a0, l0), (f1, a1, l1) = got["cpu"], got["device"]
    cos = np.sum(f0 * f1, -1) / np.maximum(
        np.linalg.norm(f0, axis=-1) * np.linalg.norm(f1, axis=-1), 1e-12)
    out[dtype] = {"max_abs_feature_diff": float(np.abs(f0 - f1).max()),
                  "min_feature_cosine": float(cos.min()),
                  "max_abs_area_diff": float(np.abs(a0 - a1).max()),
                  "train_loss_cpu": l0, "train_loss_device": l1,
                  "train_loss_rel_diff": abs(l0 - l1) / max(abs(l0), 1e-12)}
    # float32 on a GPU may use TF32 convolutions (XLA's default precision).
    floor, loss_tol = (0.999, 1e-2) if dtype == "float32" else (0.99, 5e-2)
    out[dtype]["ok"] = (out[dtype]["min_feature_cosine"] >= floor
                        and out[dtype]["train_loss_rel_diff"] <= loss_tol)
    print(f"{dtype}: {json.dumps(out[dtype])}", flush=True)
  return out


def _run_script(script: str, argv: list[str], json_path: str) -> dict:
  """Runs one of our benchmark scripts in this process's stdout; returns its --json."""
  cmd = [sys.executable, str(ROOT / "scripts" / script), *argv, "--json", json_path]
  print("$ " + " ".join(cmd[1:]), flush=True)
  subprocess.run(cmd, check=True)
  return json.loads(pathlib.Path(json_path).read_text())


def part_train(args) -> dict:
  shape = SHAPES[args.dry_run]
  argv = ["--depth", str(shape["depth"]), "--image_size", str(shape["image_size"]),
          "--batch", str(shape["batch"]), "--num_classes", str(shape["num_classes"]),
          "--contenders", shape["contenders"], "--reps", str(shape["train_reps"]),
          "--steps", str(shape["train_steps"]), "--warmup", str(shape["train_warmup"])]
  return _run_script("bench_train.py", argv, args.part_json + ".train")


def part_eval(args) -> dict:
  return _run_script("bench_eval.py", SHAPES[args.dry_run]["eval"], args.part_json + ".eval")


# ----------------------------------------------------------------------- orchestration


def _summary_md(summary: dict) -> str:
  lines = [f"# GPU check ({'dry run, CPU' if summary['dry_run'] else 'GPU'})", ""]
  status = summary["status"]
  lines += ["| part | status | seconds |", "|---|---|---|"]
  lines += [f"| {p} | {status[p]['status']} | {status[p]['seconds']:.0f} |" for p in status]
  platform = summary.get("platform")
  if platform:
    lines += ["", f"jax {platform['jax']} on {', '.join(platform['devices'])}; torch "
              f"{platform['torch']}; conv_impl auto -> {platform['conv_impl_auto']} "
              f"(cuDNN: {platform['conv_lowered_to_cudnn']})"]
  parity = summary.get("parity")
  if parity:
    lines += ["", "| parity GPU vs CPU | max abs feature diff | min cosine | loss rel diff | ok |",
              "|---|---|---|---|---|"]
    for d in ("float32", "bfloat16"):
      p = parity[d]
      lines.append(f"| {d} | {p['max_abs_feature_diff']:.2e} | {p['min_feature_cosine']:.6f} "
                   f"| {p['train_loss_rel_diff']:.2e} | {p['ok']} |")
  train = summary.get("train")
  if train:
    lines += ["", "| train step | img/s | vs torch eager | vs best torch | peak MiB |",
              "|---|---|---|---|---|"]
    for name, r in train["contenders"].items():
      ratio = lambda v: f"{v:.2f}x" if v else "-"
      peak = f"{r['peak_device_bytes'] / 2**20:,.0f}" if r["peak_device_bytes"] else "-"
      lines.append(f"| {name} | {r['img_s']:,.1f} | {ratio(r['vs_torch_eager'])} "
                   f"| {ratio(r['vs_best_torch'])} | {peak} |")
  ev = summary.get("eval")
  if ev:
    lines += ["", f"evaluation {ev['queries']:,} x {ev['gallery']:,} (P={ev['parts']}, "
              f"C={ev['channels']}): {ev['evaluate_s']:.2f} s warm, GEMM share "
              f"{ev['gemm_share']:.0%} of the measured float32 rate "
              f"({ev['gemm_gflops']:,.0f} GFLOP/s); official pipeline on the block "
              f"{ev['official_vs_ours']:.1f}x slower"]
  lines += ["", "Goals: " + "; ".join(summary["goals"])]
  return "\n".join(lines) + "\n"


def _goals(summary: dict) -> list[str]:
  goals = []
  train = summary.get("train", {}).get("contenders", {})
  for dtype in ("float32", "bfloat16"):
    jax_rows = {n: r for n, r in train.items() if n.startswith("jax")
                and n.endswith(":bfloat16") == (dtype == "bfloat16") and r["vs_torch_eager"]}
    if jax_rows:
      name, r = max(jax_rows.items(), key=lambda kv: kv[1]["img_s"])
      goals.append(f"{dtype} JAX/torch eager {r['vs_torch_eager']:.2f}x (goal {GOAL_RATIO}x)")
      if dtype == "bfloat16":
        goals.append(f"bfloat16 {r['img_s']:,.0f} img/s (goal {GOAL_BF16_IMG_S:,.0f})")
  if "eval" in summary:
    goals.append(f"evaluation {summary['eval']['evaluate_s']:.2f} s (goal <= {GOAL_EVAL_S} s "
                 "at VERI-Wild large)")
  return goals or ["no figures"]


def orchestrate(args) -> int:
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  shape = SHAPES[args.dry_run]
  pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
  env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=pythonpath)
  if args.dry_run:
    env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
  summary = {"dry_run": args.dry_run, "status": {}}
  start = time.perf_counter()
  with tempfile.TemporaryDirectory() as tmp:
    for part in args.parts.split(","):
      if part not in PARTS:
        raise SystemExit(f"--parts: unknown part {part!r}; expected some of {PARTS}")
      part_json = os.path.join(tmp, part)
      cmd = [sys.executable, __file__, "--part", part, "--part_json", part_json]
      cmd += ["--dry-run"] if args.dry_run else []
      print(f"\n=== {part} (limit {shape['timeouts'][part]} s) ===", flush=True)
      t0 = time.perf_counter()
      with open(out / f"{part}.log", "w") as log:
        # A process group of its own, so a part that runs out of time goes with its children.
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, cwd=ROOT, start_new_session=True)
        copier = _tee(proc, log)
        try:
          status = ("ok" if proc.wait(timeout=shape["timeouts"][part]) == 0
                    else f"failed (exit {proc.returncode})")
        except subprocess.TimeoutExpired:
          os.killpg(proc.pid, signal.SIGKILL)
          proc.wait()
          status = f"timed out after {shape['timeouts'][part]} s"
        copier.join(timeout=5)
      summary["status"][part] = {"status": status, "seconds": time.perf_counter() - t0}
      print(f"=== {part}: {status}, {time.perf_counter() - t0:.0f} s", flush=True)
      if status == "ok":
        summary[part] = json.loads(pathlib.Path(part_json).read_text())
      elif part == "platform":
        break  # without the platform check nothing else is meaningful
  summary["goals"] = _goals(summary)
  summary["total_s"] = time.perf_counter() - start
  (out / "summary.json").write_text(json.dumps(summary, indent=2))
  (out / "summary.md").write_text(_summary_md(summary))
  print("\n" + _summary_md(summary) + f"\n{summary['total_s']:.0f} s in all; wrote {out}/")
  return 0 if all(s["status"] == "ok" for s in summary["status"].values()) else 1


def _tee(proc: subprocess.Popen, log) -> threading.Thread:
  """Copies the part's output to the console and its log, in a thread."""

  def copy():
    for line in proc.stdout:
      sys.stdout.write(line)
      sys.stdout.flush()
      log.write(line)
      log.flush()

  thread = threading.Thread(target=copy, daemon=True)
  thread.start()
  return thread


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--dry-run", dest="dry_run", action="store_true",
                      help="CPU only, tiny shapes (the test that keeps this script working)")
  parser.add_argument("--out", default=str(ROOT / "workdirs" / "gpu_check"))
  parser.add_argument("--parts", default=",".join(PARTS))
  parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)
  parser.add_argument("--part_json", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.part is None:
    return orchestrate(args)
  result = {"platform": part_platform, "parity": part_parity, "train": part_train,
            "eval": part_eval}[args.part](args)
  pathlib.Path(args.part_json).write_text(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
