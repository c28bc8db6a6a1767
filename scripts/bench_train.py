"""Images/second of the full MUSP train step, JAX against a PyTorch reference.

    python scripts/bench_train.py                                  # ResNet-50, 256 px, batch 64
    python scripts/bench_train.py --image_size 128 --batch 16      # a small CPU
    python scripts/bench_train.py --contenders jax:gemm,jax:xla,torch:eager

Every contender is a persistent process (model built, step compiled and warmed
up once); the processes then take turns running --steps steps each, for --reps
rounds, so slow drifts of a shared machine hit all of them alike. The figure is
the median over rounds; warm-up and compilation are excluded.

Contenders:
  jax:<conv_impl>[:bfloat16]  the project's own build_model + total_loss +
      make_optimizer + step.jit_step (the program training runs)
      (conv_impl: xla | gemm | auto, see musp_jax/models/fast_conv.py);
  torch:eager | torch:eager_cl | torch:compile | torch:compile_cl (_cl:
      channels_last) — torchvision ResNet-50 with last stride 1, a restatement
      of the official MUSP head (or the baseline head) and the same three
      losses, Adam with coupled weight decay; torch:*:bfloat16 runs under
      autocast.
Batches are uint8 images with erase boxes, as the input pipeline hands them over
(JAX normalises and erases inside the step; PyTorch gets normalised float images).
Ratios are printed against PyTorch eager of the same dtype (torch:eager, else
torch:eager_cl; the goal: >= 1.2x on CPU, >= 1.5x on GPU) and against the fastest
PyTorch contender of the same dtype. On a GPU the peak device memory of each
contender's step is printed too.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import time

DEFAULT_CONTENDERS = "jax:auto,jax:xla,torch:eager,torch:eager_cl,torch:compile"
TORCH_MODES = ("eager", "eager_cl", "compile", "compile_cl")


# ----------------------------------------------------------------------------- JAX


def _jax_worker(conn, args, conv_impl: str, dtype: str) -> None:
  """Builds the project's train step and runs it on request."""
  import jax
  import numpy as np
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from configs import common
  from musp_jax.core import optim
  from musp_jax.runtime import process
  from musp_jax.core import state as state_lib
  from musp_jax.core import step as step_lib
  from musp_jax.models import build_model
  from musp_jax.models import fast_conv

  c = common.get_config()
  c.model.depth = args.depth
  c.model.head = args.head
  c.model.dtype = dtype
  c.model.conv_impl = conv_impl
  size = (args.image_size, args.image_size)
  mesh = process.make_mesh()
  model = build_model(c.model, args.num_classes)
  tx = optim.make_optimizer(c.optim, 100)
  state, state_sharding = state_lib.create_train_state(model, tx, size, seed=0, mesh=mesh)
  batch_sharding = NamedSharding(mesh, P("data"))
  step = step_lib.jit_step(model=model, tx=tx, loss_config=c.loss, input_config=c.input,
                           mesh=mesh, state_sharding=state_sharding)
  # As the input pipeline hands batches over: uint8 pixels and erase boxes (the step
  # normalises and erases on the device).
  batch = jax.device_put(step_lib.random_batch(np.random.default_rng(0), args.batch, size,
                                               args.num_classes), batch_sharding)
  t0 = time.perf_counter()
  for _ in range(args.warmup):
    state, metrics = step(state, batch)
  loss = float(metrics["loss"])
  conn.send(("ready", f"jax {jax.__version__} on {jax.devices()[0].device_kind}, "
             f"conv_impl {conv_impl} -> {fast_conv.resolve_conv_impl(conv_impl)}, "
             f"compile+warm-up {time.perf_counter() - t0:.0f}s, loss {loss:.3f}"))
  losses_seen = [loss]
  while (msg := conn.recv()) != "stop":
    t, cpu = time.perf_counter(), time.process_time()
    for _ in range(msg):
      state, metrics = step(state, batch)
    jax.block_until_ready(state.step)
    conn.send((time.perf_counter() - t, time.process_time() - cpu))
    losses_seen.append(float(metrics["loss"]))
  stats = jax.devices()[0].memory_stats() or {}  # None on CPU
  conn.send(("losses", losses_seen, stats.get("peak_bytes_in_use")))


# --------------------------------------------------------------------------- PyTorch


def _torch_model(args, torch, nn):
  """torchvision ResNet (last stride 1) + the official MUSP head, restated."""
  import torchvision

  backbone = getattr(torchvision.models, f"resnet{args.depth}")(weights=None)
  layer4 = backbone.layer4[0]
  if args.depth >= 50:
    layer4.conv2.stride = (1, 1)
  else:
    layer4.conv1.stride = (1, 1)
  layer4.downsample[0].stride = (1, 1)
  backbone.fc = nn.Identity()
  width = 2048 if args.depth >= 50 else 512

  def neck_and_classifier():
    bn = nn.BatchNorm1d(width)
    bn.bias.requires_grad_(False)
    fc = nn.Linear(width, args.num_classes, bias=False)
    nn.init.normal_(fc.weight, std=0.01)
    return nn.ModuleList([bn, fc])

  class Net(nn.Module):

    def __init__(self):
      super().__init__()
      self.body = nn.Sequential(*list(backbone.children())[:-2])
      n = self.n = 5
      if args.head == "musp":
        self.attention = nn.Conv2d(width, n, 3, padding=1)
        self.value = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.ese = nn.Sequential(nn.Linear(n * width, n * width // 16, bias=False),
                                 nn.ReLU(inplace=True),
                                 nn.Linear(n * width // 16, n * width, bias=False),
                                 nn.Sigmoid())
        self.branches = nn.ModuleList(neck_and_classifier() for _ in range(n))
      else:
        self.branches = nn.ModuleList([neck_and_classifier()])

    def forward(self, x):
      m = self.body(x)
      if args.head != "musp":
        feats = [m.mean((2, 3))]
        diversity = m.new_zeros(())
      else:
        att = torch.softmax(self.attention(m), 1)  # B, n, h, w
        v = self.value(m)  # B, c, h, w
        parts = torch.einsum("bnhw,bchw->bcn", att, v)  # channel-major flatten
        b, c, n = parts.shape
        parts = parts.reshape(b, c * n)
        parts = (parts * self.ese(parts)).reshape(b, c, n)
        feats = [parts[:, :, k] for k in range(n - 1)] + [v.mean((2, 3))]
        diversity = att.prod(1).sum()
      logits = [fc(bn(f)) for f, (bn, fc) in zip(feats, self.branches)]
      return feats, logits, diversity

  return Net()


def _torch_losses(torch, feats, logits, diversity, labels):
  """Label-smoothed CE + batch-hard triplet (margin 0.3) per branch + diversity."""
  loss = diversity
  same = labels[:, None] == labels[None, :]
  for f, lg in zip(feats, logits):
    loss = loss + torch.nn.functional.cross_entropy(lg, labels, label_smoothing=0.1)
    sq = (f * f).sum(1)
    dist = (sq[:, None] + sq[None, :] - 2 * f @ f.t()).clamp(min=1e-12).sqrt()
    ap = (dist - 1e9 * (~same)).max(1).values
    an = (dist + 1e9 * same).min(1).values
    loss = loss + torch.relu(ap - an + 0.3).mean()
  return loss


def _torch_worker(conn, args, mode: str, dtype: str) -> None:
  import torch
  from torch import nn

  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.manual_seed(0)
  net = _torch_model(args, torch, nn).to(device).train()
  fmt = torch.channels_last if mode.endswith("_cl") else torch.contiguous_format
  net = net.to(memory_format=fmt)
  params = [p for p in net.parameters() if p.requires_grad]
  opt = torch.optim.Adam(params, lr=3.5e-4, weight_decay=5e-4)
  images = torch.randn(args.batch, 3, args.image_size, args.image_size,
                       device=device).to(memory_format=fmt)
  labels = (torch.arange(args.batch, device=device) // 4) % args.num_classes
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

  def step():
    opt.zero_grad(set_to_none=True)
    with autocast:
      feats, logits, diversity = net(images)
      loss = _torch_losses(torch, [f.float() for f in feats], [lg.float() for lg in logits],
                           diversity.float(), labels)
    loss.backward()
    opt.step()
    return loss

  if mode.startswith("compile"):
    step = torch.compile(step)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  t0 = time.perf_counter()
  for _ in range(args.warmup):
    loss = step()
  sync()
  conn.send(("ready", f"torch {torch.__version__} on {device}, "
             f"{torch.get_num_threads()} threads, compile+warm-up "
             f"{time.perf_counter() - t0:.0f}s, loss {float(loss.detach()):.3f}"))
  losses_seen = [float(loss.detach())]
  while (msg := conn.recv()) != "stop":
    t, cpu = time.perf_counter(), time.process_time()
    for _ in range(msg):
      loss = step()
    sync()
    conn.send((time.perf_counter() - t, time.process_time() - cpu))
    losses_seen.append(float(loss.detach()))
  peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
  conn.send(("losses", losses_seen, peak))


# ---------------------------------------------------------------------------- driver


def _start(ctx, name: str, args):
  parts = name.split(":")
  if len(parts) not in (2, 3) or parts[0] not in ("jax", "torch"):
    raise ValueError(f"--contenders entry {name!r}: expected jax:<xla|gemm|auto>[:bfloat16]"
                     f" or torch:<{'|'.join(TORCH_MODES)}>[:bfloat16]")
  framework, mode = parts[:2]
  dtype = parts[2] if len(parts) == 3 else "float32"
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"--contenders entry {name!r}: dtype must be float32 or bfloat16")
  if framework == "jax" and mode not in ("xla", "gemm", "auto"):
    raise ValueError(f"--contenders entry {name!r}: JAX conv_impl must be xla|gemm|auto")
  if framework == "torch" and mode not in TORCH_MODES:
    raise ValueError(f"--contenders entry {name!r}: torch mode must be one of "
                     f"{'|'.join(TORCH_MODES)}")
  parent, child = ctx.Pipe()
  target = _jax_worker if framework == "jax" else _torch_worker
  proc = ctx.Process(target=target, args=(child, args, mode, dtype), daemon=True)
  proc.start()
  child.close()  # so a contender that dies (out of memory, say) ends recv() with EOFError
  return parent, proc


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--image_size", type=int, default=256)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--depth", type=int, default=50)
  parser.add_argument("--head", default="musp", choices=("musp", "baseline"))
  parser.add_argument("--num_classes", type=int, default=576)  # VeRi-776's train ids
  parser.add_argument("--contenders", default=DEFAULT_CONTENDERS)
  parser.add_argument("--warmup", type=int, default=2, help="steps before timing")
  parser.add_argument("--steps", type=int, default=1, help="steps per timed turn")
  parser.add_argument("--reps", type=int, default=5, help="timed turns per contender")
  parser.add_argument("--json", default="", help="also write the figures to this file")
  args = parser.parse_args()
  if args.batch % 4:
    raise ValueError(f"--batch {args.batch} must be a multiple of K=4 images per id")
  # Contenders share one GPU: JAX must not take 75% of its memory up front, and its
  # peak then reads what the step needs.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

  ctx = multiprocessing.get_context("spawn")
  names = [n for n in args.contenders.split(",") if n]
  workers = {}
  # Start (and compile) one at a time, so compilations do not compete.
  for name in names:
    conn, proc = _start(ctx, name, args)
    try:
      _, info = conn.recv()
    except EOFError:
      proc.join()
      raise SystemExit(f"{name} exited (code {proc.exitcode}) before it was ready.") from None
    workers[name] = (conn, proc)
    print(f"{name:28s} ready: {info}", flush=True)
  times = {n: [] for n in names}
  cpu_times = {n: [] for n in names}
  for _ in range(args.reps):
    for name in names:
      conn, _ = workers[name]
      conn.send(args.steps)
      wall, cpu = conn.recv()
      times[name].append(wall / args.steps)
      cpu_times[name].append(cpu / args.steps)
  peaks = {}
  for name in names:
    conn, proc = workers[name]
    conn.send("stop")
    _, seen, peaks[name] = conn.recv()
    proc.join()
    if not all(map(lambda v: v == v and abs(v) < float("inf"), seen)):
      print(f"WARNING: {name} produced a non-finite loss: {seen}")

  print(f"\nMUSP train step, ResNet-{args.depth} ({args.head} head), "
        f"{args.image_size}x{args.image_size}, batch {args.batch}, last stride 1; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load {os.getloadavg()[0]:.1f}; median of {args.reps} turns x {args.steps} step(s), "
        "warm-up excluded.")
  ips = {n: args.batch / statistics.median(times[n]) for n in names}
  dtype = {n: "bfloat16" if n.endswith(":bfloat16") else "float32" for n in names}

  def reference(d):  # PyTorch eager of dtype d, and the fastest PyTorch of dtype d
    torch_d = [n for n in names if n.startswith("torch") and dtype[n] == d]
    eager = next((n for n in torch_d if n.split(":")[1] == "eager"),
                 next((n for n in torch_d if n.split(":")[1] == "eager_cl"), None))
    return eager, max(torch_d, key=ips.get) if torch_d else None

  refs = {d: reference(d) for d in set(dtype.values())}
  # CPU seconds (all threads) per step: on a shared machine wall time also
  # counts waiting for cores; CPU time shows the work each contender does.
  print(f"{'contender':28s} {'ms/step':>9s} {'img/s':>8s} {'vs torch eager':>15s} "
        f"{'vs best torch':>14s} {'CPU s/step':>11s} {'peak MiB':>9s}")
  rows = {}
  for n in names:
    eager, best = refs[dtype[n]]
    rows[n] = {"ms_per_step": 1e3 * statistics.median(times[n]), "img_s": ips[n],
               "vs_torch_eager": ips[n] / ips[eager] if eager else None,
               "vs_best_torch": ips[n] / ips[best] if best else None,
               "cpu_s_per_step": statistics.median(cpu_times[n]),
               "peak_device_bytes": peaks[n]}
    r1 = f"{rows[n]['vs_torch_eager']:.2f}x" if eager else "-"
    r2 = f"{rows[n]['vs_best_torch']:.2f}x" if best else "-"
    peak = f"{peaks[n] / 2**20:9,.0f}" if peaks[n] else f"{'-':>9s}"
    print(f"{n:28s} {rows[n]['ms_per_step']:9.0f} {ips[n]:8.2f} {r1:>15s} {r2:>14s} "
          f"{rows[n]['cpu_s_per_step']:11.2f} {peak}")
  goals = []
  for d in sorted(refs):
    jax_d = [n for n in names if n.startswith("jax") and dtype[n] == d]
    eager, best = refs[d]
    if jax_d and eager:
      best_jax = max(jax_d, key=ips.get)
      goals.append(f"{d}: {best_jax} is {ips[best_jax] / ips[eager]:.2f}x {eager}"
                   + (f", {ips[best_jax] / ips[best]:.2f}x {best}" if best != eager else ""))
  if goals:
    print("\nGoal: JAX >= 1.2x PyTorch eager on CPU (1.5x on GPU): " + "; ".join(goals) + ".")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"config": vars(args), "contenders": rows}, f, indent=2)


if __name__ == "__main__":
  main()
