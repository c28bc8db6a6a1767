"""The paper's ablation (Tables 5 and 6) in miniature, on the synthetic vehicles.

    python scripts/ablation.py --workdir workdirs/ablation               # 2-core CPU, 34 min
    python scripts/ablation.py --workdir workdirs/ablation --scale 20    # a GPU: 200 epochs
    python scripts/ablation.py ... --set dataset.builder_config=large --set model.depth=50

Trains the bag-of-tricks baseline, MUSP with n = 2, 3, 5 attention maps and MUSP n = 5
without ESE, each with --seeds seeds, through train.train_and_evaluate (the driver behind
musp_jax.main), from the demo recipe (configs/synthetic.py) with its training length
multiplied by --scale (default 0.5: 5 of the demo's 10 epochs; all 15 runs took 34 min
on a 2-core CPU) and any config field changed with --set. Each run evaluates once, at its
end, with the protocol and, for
MUSP, the attention scores against the ground-truth part masks
(musp_jax/attention_scores.py). Prints mean +- standard deviation over seeds (sample
std, ddof=1) in tables shaped like the paper's Tables 5 (number of attentions) and 6
(ESE), plus the attention scores, and writes ablation.md, ablation.json and ablation.png
into --workdir. Runs live in <workdir>/<variant>/seed<k>; a finished run is read back,
an interrupted one resumes, so the command can simply be run again.
"""

from __future__ import annotations

import argparse
import ast
import json
import pathlib
import statistics
import sys
import time
from typing import Any, Sequence

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python scripts/ablation.py` from anywhere
  sys.path.insert(0, str(ROOT))

# name -> config fields that differ from the recipe (the MUSP default is n = 5 with ESE).
VARIANTS = {
    "baseline": {"model.head": "baseline"},
    "MUSP n=2": {"model.num_prototypes": 2},
    "MUSP n=3": {"model.num_prototypes": 3},
    "MUSP n=5": {"model.num_prototypes": 5},
    "MUSP n=5 ESE off": {"model.num_prototypes": 5, "model.ese": "none"},
}
DEFAULT_SCALE = 0.5  # of the demo's epochs: 15 runs of 5 epochs, 34 min on 2 cores
RETRIEVAL = ("mAP", "CMC@1", "CMC@5")
ATTENTION = ("parts_on_vehicle", "background_on_background", "background_taken",
             "image_dependence", "part_iou")
ATTENTION_TITLES = ("parts on vehicle", "bg map on bg", "bg taken", "image dependence",
                    "part IoU")


def _set(c, key: str, value: Any) -> None:
  """c.a.b = value for key "a.b"; an unknown key is an error naming it."""
  *path, field = key.split(".")
  node = c
  for part in path:
    node = node.get(part) if hasattr(node, "get") else None
  if node is None or not hasattr(node, "get") or field not in node:
    raise ValueError(f"Unknown config field {key!r} (see configs/common.py).")
  node[field] = value


def parse_set(text: str) -> tuple[str, Any]:
  """"a.b=value" -> ("a.b", value); the value as a Python literal if it is one."""
  key, sep, raw = text.partition("=")
  if not sep or not key:
    raise argparse.ArgumentTypeError(f"--set {text!r}: expected KEY=VALUE.")
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw
  return key.strip(), value


def run_config(variant: str, seed: int, *, scale: float,
               overrides: Sequence[tuple[str, Any]] = ()):
  """The recipe of configs/synthetic.py with the variant's fields, the seed and the
  training length scaled, then `overrides`; one evaluation, at the end."""
  from configs import synthetic
  c = synthetic.get_config()
  for key, value in VARIANTS[variant].items():
    _set(c, key, value)
  c.seed = seed
  epochs = max(1, round(c.optim.num_epochs * scale))
  ratio = epochs / c.optim.num_epochs
  if c.optim.warmup_epochs:  # a scaled warm-up keeps at least one epoch
    c.optim.warmup_epochs = min(epochs, max(1, round(c.optim.warmup_epochs * ratio)))
  c.optim.milestones = tuple(sorted({max(1, round(m * ratio)) for m in c.optim.milestones
                                     if round(m * ratio) < epochs}))
  c.optim.num_epochs = epochs
  c.eval.every_epochs = epochs
  c.checkpoint_every_steps = 10**9  # the evaluation step saves the only checkpoint
  for key, value in overrides:
    _set(c, key, value)
  return c


def read_run(workdir: pathlib.Path) -> dict[str, Any]:
  """The retrieval metrics (first protocol row) and attention summaries of a finished run."""
  from musp_jax.training import attention_scores
  results = json.loads((workdir / "results.json").read_text())
  rows = dict(results["results"])
  attention = rows.pop(attention_scores.ROW, None)
  first = next(iter(rows.values()))
  out = {k: float(first[k]) for k in RETRIEVAL}
  for k in ATTENTION:
    out[k] = None if attention is None else attention[k]
  out["step"] = int(results["step"])
  return out


def aggregate(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
  """Per variant (in first-seen order) and metric: mean, sample std (ddof=1; 0 for one
  value) and the number of values, over seeds; None values (undefined) are left out."""
  stats: dict[str, dict[str, Any]] = {}
  for variant in dict.fromkeys(r["variant"] for r in records):
    runs = [r for r in records if r["variant"] == variant]
    stats[variant] = {"seeds": [r["seed"] for r in runs]}
    for k in RETRIEVAL + ATTENTION:
      values = [float(r[k]) for r in runs if r.get(k) is not None]
      if not values:
        stats[variant][k] = None
        continue
      std = statistics.stdev(values) if len(values) > 1 else 0.0
      stats[variant][k] = {"mean": statistics.fmean(values), "std": std, "n": len(values)}
  return stats


def _cell(stat: dict[str, Any] | None, total: int) -> str:
  if stat is None:
    return "-"
  text = f"{100 * stat['mean']:.1f} +- {100 * stat['std']:.1f}"
  return text if stat["n"] == total else f"{text} ({stat['n']}/{total})"


def tables(stats: dict[str, dict[str, Any]]) -> str:
  """Markdown tables shaped like the paper's Tables 5 and 6, then the attention scores."""

  def rows(names: Sequence[str], label, keys) -> list[str]:
    out = []
    for name in names:
      if name in stats:
        s = stats[name]
        out.append(f"| {label(name)} | "
                   + " | ".join(_cell(s[k], len(s["seeds"])) for k in keys) + " |")
    return out

  musp = [v for v in ("MUSP n=5", "MUSP n=3", "MUSP n=2") if v in stats]
  lines = ["Table 5 in miniature: MUSP by number of attentions, and the baseline "
           "(%, mean +- std over seeds)", "",
           "| number of attentions | mAP | CMC@1 | CMC@5 |", "|---|---|---|---|"]
  lines += rows(musp, lambda v: v.split("=")[1], RETRIEVAL)
  lines += rows(["baseline"], lambda v: "baseline (no attention)", RETRIEVAL)
  lines += ["", "Table 6 in miniature: the channel-wise attention (ESE), n = 5", "",
            "| method | mAP | CMC@1 | CMC@5 |", "|---|---|---|---|"]
  lines += rows(["MUSP n=5"], lambda v: "MUSP w ESE", RETRIEVAL)
  lines += rows(["MUSP n=5 ESE off"], lambda v: "MUSP w/o ESE", RETRIEVAL)
  lines += ["", "Attention against the ground-truth part masks (%; "
            "musp_jax/attention_scores.py)", "",
            "| variant | " + " | ".join(ATTENTION_TITLES) + " |",
            "|---" * (len(ATTENTION) + 1) + "|"]
  lines += rows([v for v in stats if v != "baseline"], lambda v: v, ATTENTION)
  return "\n".join(lines) + "\n"


def figure(stats: dict[str, dict[str, Any]], records: Sequence[dict[str, Any]], path):
  """Bars of mean +- std per variant (retrieval, attention), one dot per seed."""
  import numpy as np
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  names = list(stats)
  fig = Figure(figsize=(13, 4.5), dpi=100)
  FigureCanvasAgg(fig)
  panels = ((RETRIEVAL[:2], RETRIEVAL[:2], names, "retrieval (%)"),
            (ATTENTION, ATTENTION_TITLES, [n for n in names if n != "baseline"],
             "attention vs part masks (%)"))
  for ax, (keys, titles, shown, title) in zip(fig.subplots(1, 2), panels):
    width = 0.8 / max(1, len(shown))
    for i, name in enumerate(shown):
      x = np.arange(len(keys)) + (i - (len(shown) - 1) / 2) * width
      means = [100 * stats[name][k]["mean"] if stats[name][k] else np.nan for k in keys]
      stds = [100 * stats[name][k]["std"] if stats[name][k] else 0.0 for k in keys]
      ax.bar(x, means, width, yerr=stds, capsize=2, label=name, alpha=0.8)
      for j, k in enumerate(keys):
        seeds = [100 * r[k] for r in records if r["variant"] == name and r[k] is not None]
        ax.plot([x[j]] * len(seeds), seeds, "k.", markersize=3)
    ax.set_xticks(np.arange(len(keys)), titles, fontsize=9)
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle("MUSP ablation on synthetic vehicles: mean +- std over seeds (dots)",
               fontsize=11)
  fig.tight_layout()
  fig.savefig(str(path), dpi=100)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--scale", type=float, default=DEFAULT_SCALE,
                      help="Multiplies the demo recipe's epochs (default: "
                           f"{DEFAULT_SCALE}, 34 min on a 2-core CPU; e.g. 20 on a GPU).")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--variants", default=",".join(VARIANTS),
                      help=f"Comma-separated subset of: {', '.join(VARIANTS)}.")
  parser.add_argument("--set", type=parse_set, action="append", default=[],
                      metavar="KEY=VALUE",
                      help="A config field for every run, e.g. dataset.builder_config=large "
                           "or input.image_size=(128,128); repeatable.")
  args = parser.parse_args(argv)
  variants = [v.strip() for v in args.variants.split(",") if v.strip()]
  unknown = [v for v in variants if v not in VARIANTS]
  if unknown or not variants:
    parser.error(f"--variants: unknown {unknown}; expected some of {list(VARIANTS)}.")
  if args.seeds < 1 or args.scale <= 0:
    parser.error("--seeds must be >= 1 and --scale > 0.")
  try:
    run_config(variants[0], 0, scale=args.scale, overrides=args.set)
  except ValueError as e:
    parser.error(str(e))

  from musp_jax.runtime import process
  from musp_jax.training import train
  process.setup()
  root = pathlib.Path(args.workdir).expanduser()
  root.mkdir(parents=True, exist_ok=True)
  records, start = [], time.time()
  for variant in variants:
    for seed in range(args.seeds):
      config = run_config(variant, seed, scale=args.scale, overrides=args.set)
      workdir = root / variant.replace(" ", "").replace(",", "_").replace("=", "") / f"seed{seed}"
      t = time.time()
      train.train_and_evaluate(config, str(workdir))
      record = {"variant": variant, "seed": seed, **read_run(workdir),
                "seconds": time.time() - t}
      records.append(record)
      print(f"{variant}, seed {seed}: mAP {100 * record['mAP']:.1f}, CMC@1 "
            f"{100 * record['CMC@1']:.1f} ({record['seconds']:.0f} s)", flush=True)
  stats = aggregate(records)
  elapsed = time.time() - start
  text = (tables(stats) + f"\n{len(records)} runs (scale {args.scale:g}) in "
          f"{elapsed / 60:.1f} min.\n")
  (root / "ablation.md").write_text(text)
  (root / "ablation.json").write_text(json.dumps(
      {"scale": args.scale, "seconds": elapsed, "runs": records, "stats": stats}, indent=2))
  figure(stats, records, root / "ablation.png")
  print("\n" + text + f"\nWritten: {root / 'ablation.md'}, {root / 'ablation.json'}, "
        f"{root / 'ablation.png'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
