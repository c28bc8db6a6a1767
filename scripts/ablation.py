"""The paper's ablation (Tables 5 and 6) in miniature, on the synthetic vehicles; the
soft-partition study and its probes.

    python scripts/ablation.py --workdir workdirs/ablation               # 2-core CPU, 34 min
    python scripts/ablation.py --workdir workdirs/ablation --scale 20    # a GPU: 200 epochs
    python scripts/ablation.py ... --set dataset.builder_config=large --set model.depth=50
    # the soft-partition study (README, "Synthetic vehicles"): pretraining, then the
    # parts-decide-identity set, on the numerical core alone (no TensorFlow, tfds, grain)
    python scripts/ablation.py --workdir workdirs/study --runner core --config parts,study \
        --pretrain_scale 1
    # one probe: a condition, one seed, MUSP n = 5 only
    python scripts/ablation.py --workdir workdirs/probe/NAME --runner core --config parts \
        --variants "MUSP n=5" --seeds 1 --scale 0.3 --set model.attention_temperature=4

Trains the bag-of-tricks baseline, MUSP with n = 2, 3, 5 attention maps and MUSP n = 5
without ESE, each with --seeds seeds (seed-major: every variant's seed 0 first), from
the demo recipe (configs/synthetic.py, plus the variant words of --config) with its
training length multiplied by --scale (default 0.5: 5 of the demo's 10 epochs; all 15
runs took 34 min on a 2-core CPU) and any config field changed with --set. Each run
evaluates once, at its end, with the protocol and, for MUSP, the attention scores
against the ground-truth part masks (musp_jax/training/attention_scores.py). Prints mean +-
standard deviation over seeds (sample std, ddof=1) in tables shaped like the paper's
Tables 5 (number of attentions) and 6 (ESE), MUSP n = 5 against the baseline with
Welch's t, and the attention scores, and writes ablation.md, ablation.json,
ablation.png and (where matplotlib and the tools import) ablation_maps.png, the maps
of MUSP n = 5 beside the ground-truth part maps, into --workdir.

Runners: `train` (default) runs train.train_and_evaluate, the driver behind
musp_jax.main, on the built dataset; `core` (musp_jax/training/in_memory.py) trains on
the set rendered in memory and needs only jax, flax, optax, orbax, numpy and OpenCV, as on a bare GPU image
(`bash scripts/gpu_check.sh study`). --pretrain_scale S > 0 first trains the
`pretrain` recipe of configs/synthetic.py (its length times S; --pretrain_set changes
its fields) into <workdir>/pretrain and starts every run from it (model.init_from).
Runs live in <workdir>/<variant>/seed<k>; a finished run is read back, an interrupted
one resumes (train) or starts again (core), so the command can simply be run again.
The baseline and MUSP n = 5 run first, seed by seed, then the other variants; the tables
are rewritten after every run, and --deadline stops starting runs after that many
minutes. --dry-run runs the core runner at tiny shapes (tests), whatever else is set.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
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
COUNTS = ("distinct_parts",)  # attention summaries that are counts, not shares
RUNNERS = ("train", "core")
# --dry-run: the core runner at tiny shapes, one short epoch (tests).
DRY_RUN = (("dataset.builder_config", "tiny"), ("input.image_size", (32, 32)),
           ("input.num_ids", 4), ("input.num_instances", 2), ("eval.batch_size", 32),
           ("model.depth", 18), ("model.conv_impl", "xla"), ("optim.num_epochs", 1),
           ("optim.warmup_epochs", 0), ("optim.milestones", ()))


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


def run_config(variant: str | None, seed: int, *, scale: float,
               overrides: Sequence[tuple[str, Any]] = (), words: str = ""):
  """The recipe of configs/synthetic.py (with its variant `words`) with the variant's
  fields, the seed and the training length scaled, then `overrides`; one evaluation,
  at the end. variant None: the recipe's own model (the pretraining run)."""
  from configs import synthetic
  c = synthetic.get_config(words or None)
  for key, value in VARIANTS[variant].items() if variant else ():
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
  for k in ATTENTION + COUNTS:
    out[k] = None if attention is None else attention[k]
  out["step"] = int(results["step"])
  if "reference" in results:  # core runs: the ground truth scored as maps
    out["reference"] = {k: results["reference"][k] for k in ("grid",) + ATTENTION + COUNTS}
  return out


# The ground-truth part map as n = 5 maps (the last the background): what a perfect
# soft partition scores at a map size (cells mix classes on small maps).
REFERENCE_GROUPS = (("body",), ("windows",), ("lamps", "wheels"),
                    ("roof item", "sticker/stripe"), ("background",))


def reference_row(masks, grid_hw: tuple[int, int]) -> dict[str, Any]:
  """The attention scores of REFERENCE_GROUPS drawn from the label maps themselves."""
  import numpy as np

  from musp_jax.training import attention_scores
  from tfds_builders.synthetic_vehicles.render import PART_CLASSES
  fractions = np.stack([attention_scores.class_fractions(m, grid_hw, len(PART_CLASSES))
                        for m in masks])
  groups = [[PART_CLASSES.index(c) for c in g] for g in REFERENCE_GROUPS]
  maps = np.stack([fractions[..., g].sum(-1) for g in groups], -1)
  row = attention_scores.to_row(attention_scores.score_maps(maps, fractions), len(masks),
                               PART_CLASSES)
  return {"grid": list(grid_hw), **{k: row[k] for k in ATTENTION + COUNTS}}


def aggregate(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
  """Per variant (in first-seen order) and metric: mean, sample std (ddof=1; 0 for one
  value) and the number of values, over seeds; None values (undefined) are left out."""
  stats: dict[str, dict[str, Any]] = {}
  for variant in dict.fromkeys(r["variant"] for r in records):
    runs = [r for r in records if r["variant"] == variant]
    stats[variant] = {"seeds": [r["seed"] for r in runs]}
    for k in RETRIEVAL + ATTENTION + COUNTS:
      values = [float(r[k]) for r in runs if r.get(k) is not None]
      if not values:
        stats[variant][k] = None
        continue
      std = statistics.stdev(values) if len(values) > 1 else 0.0
      stats[variant][k] = {"mean": statistics.fmean(values), "std": std, "n": len(values)}
  return stats


def _cell(stat: dict[str, Any] | None, total: int, scale: float = 100.0) -> str:
  if stat is None:
    return "-"
  text = f"{scale * stat['mean']:.1f} +- {scale * stat['std']:.1f}"
  return text if stat["n"] == total else f"{text} ({stat['n']}/{total})"


def welch(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
  """(mean(a) - mean(b), Welch's t, its Welch-Satterthwaite degrees of freedom) for
  two samples of at least two values each (t and df are nan when both spreads are 0)."""
  if len(a) < 2 or len(b) < 2:
    raise ValueError(f"Welch's t needs >= 2 values per sample, got {len(a)} and {len(b)}.")
  va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
  diff = statistics.fmean(a) - statistics.fmean(b)
  if va + vb == 0:
    return diff, math.nan, math.nan
  df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
  return diff, diff / math.sqrt(va + vb), df


def comparison(records: Sequence[dict[str, Any]], variant: str = "MUSP n=5",
               reference: str = "baseline") -> str:
  """One line per retrieval metric: variant minus reference, Welch's t and df."""
  lines = []
  for k in RETRIEVAL[:2]:
    a = [r[k] for r in records if r["variant"] == variant]
    b = [r[k] for r in records if r["variant"] == reference]
    if len(a) < 2 or len(b) < 2:
      return ""
    diff, t, df = welch(a, b)
    lines.append(f"{variant} vs {reference}, {k}: {100 * diff:+.1f} points "
                 f"(Welch's t = {t:.2f}, df = {df:.1f}; {len(a)} and {len(b)} seeds)")
  return "\n".join(lines) + "\n"


def tables(stats: dict[str, dict[str, Any]], records: Sequence[dict[str, Any]] = ()) -> str:
  """Markdown tables shaped like the paper's Tables 5 and 6, MUSP n = 5 against the
  baseline (Welch's t, from `records`), then the attention scores."""

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
  versus = comparison(records)
  if versus:
    lines += ["", versus.rstrip("\n")]
  lines += ["", "Attention against the ground-truth part masks (%; distinct best parts: "
            "a count; musp_jax/training/attention_scores.py)", "",
            "| variant | " + " | ".join(ATTENTION_TITLES) + " | distinct parts |",
            "|---" * (len(ATTENTION) + 2) + "|"]
  for name in stats:
    if name != "baseline":
      s = stats[name]
      total = len(s["seeds"])
      lines.append(f"| {name} | " + " | ".join(_cell(s[k], total) for k in ATTENTION)
                   + " | " + " | ".join(_cell(s[k], total, 1.0) for k in COUNTS) + " |")
  references = {}
  for r in records:
    if "reference" in r:
      references.setdefault(tuple(r["reference"]["grid"]), r["reference"])
  for (h, w), ref in references.items():
    lines.append(f"| ground truth as 5 maps, {h} x {w} (reference) | " + " | ".join(
        "-" if ref[k] is None else f"{100 * ref[k]:.1f}" for k in ATTENTION)
                 + f" | {ref['distinct_parts']} |")
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
      ax.bar(x, means, width, yerr=stds, capsize=2, label=name, alpha=0.8,
             color=f"C{names.index(name)}")  # one colour per variant in both panels
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


MAPS_FILE = "maps.npz"  # a core run's first query images, part masks and maps
PICTURE_IMAGES = 6


class CoreRunner:
  """Runs a config with musp_jax/training/in_memory.py on the set rendered in memory."""

  def __init__(self):
    from musp_jax.runtime import process
    from musp_jax.training import in_memory
    self.in_memory = in_memory
    self.mesh = process.make_mesh()
    self.splits: dict[str, Any] = {}

  def _splits(self, name: str):
    if name not in self.splits:
      t = time.time()
      from tfds_builders.synthetic_vehicles import scenes
      self.splits[name] = {split: self.in_memory.MemorySplit.from_records(records)
                           for split, records in scenes.render_set(name).items()}
      print(f"rendered {name}: " + ", ".join(f"{len(v)} {k}" for k, v in
                                              self.splits[name].items())
            + f" ({time.time() - t:.0f} s)", flush=True)
    return self.splits[name]

  def __call__(self, config, workdir: pathlib.Path, *, save: bool = False) -> None:
    import numpy as np

    from musp_jax.data import augment
    from musp_jax.training import attention_scores
    from tfds_builders.synthetic_vehicles.render import PART_CLASSES
    if config.dataset.name != "synthetic_vehicles":
      raise ValueError(f"--runner core renders the synthetic vehicles only, not "
                       f"dataset.name={config.dataset.name!r}.")
    try:  # the config check reads the dataset table, which needs tfds
      from musp_jax.training import validate
    except ImportError:
      validate = None
    if validate is not None:
      validate.check_config(config, mode="train")
    splits = self._splits(config.dataset.builder_config)
    trained = self.in_memory.train(config, splits["train"], mesh=self.mesh)
    rows, maps = self.in_memory.evaluate(trained.model, trained.state.variables, config,
                                          splits, mesh=self.mesh, classes=PART_CLASSES)
    workdir.mkdir(parents=True, exist_ok=True)
    if save:
      self.in_memory.save(trained, config, str(workdir))
    if maps:
      query = splits["query"]
      count = min(PICTURE_IMAGES, len(query))
      np.savez_compressed(
          workdir / MAPS_FILE, maps=maps["query"][:count],
          images=np.array([augment.decode(b) for b in query.images[:count]], object),
          masks=np.array([attention_scores.decode_mask(m, where=n) for m, n in
                          zip(query.part_masks[:count], query.file_names)], object),
          names=np.array(query.file_names[:count]))
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    results = {"step": int(self.in_memory.schedule(config, len(splits["train"]))[1]),
               "seconds": trained.seconds, "history": trained.history, "results": rows}
    if maps:
      masks = [attention_scores.decode_mask(m, where=n) for role in ("query", "gallery")
               for m, n in zip(splits[role].part_masks, splits[role].file_names)]
      results["reference"] = reference_row(masks, maps["query"].shape[1:3])
    (workdir / "results.json").write_text(json.dumps(results, indent=2))


def train_runner(config, workdir: pathlib.Path, *, save: bool = True) -> None:
  del save  # a training workdir holds its checkpoints
  from musp_jax.training import train
  train.train_and_evaluate(config, str(workdir))


def maps_picture(workdir: pathlib.Path, path: pathlib.Path) -> str | None:
  """The saved maps of a core run beside the ground-truth part maps, or None when
  there are none or the drawing tools do not import (a bare GPU image: draw them
  later by running the same command where they do)."""
  import numpy as np
  if not (workdir / MAPS_FILE).exists():
    return None
  try:
    from musp_jax.training import figures
    from tfds_builders.synthetic_vehicles.render import PART_CLASSES
  except ImportError as e:
    print(f"No picture of the maps here ({e}); run the command again where the tools "
          "import.")
    return None
  with np.load(workdir / MAPS_FILE, allow_pickle=True) as f:
    fig = figures.attention_parts_figure(list(f["images"]), list(f["masks"]), f["maps"],
                                         PART_CLASSES, [str(n) for n in f["names"]])
  fig.savefig(str(path), dpi=60)
  return str(path)


def run_order(variants: Sequence[str], seeds: int) -> list[tuple[str, int]]:
  """(variant, seed) in the order they run: MUSP n = 5 and the baseline first, seed by
  seed (the comparison that matters most, complete when a deadline stops the rest),
  then every other variant's seed 0, seed 1, ..."""
  first = [v for v in ("baseline", "MUSP n=5") if v in variants]
  rest = [v for v in variants if v not in first]
  return ([(v, k) for k in range(seeds) for v in first]
          + [(v, k) for k in range(seeds) for v in rest])


def write_tables(root: pathlib.Path, args, records, pretrain, skipped, elapsed: float
                 ) -> tuple[str, dict]:
  """Writes ablation.md and ablation.json for the runs so far; returns the text and
  the statistics."""
  stats = aggregate(records)
  text = tables(stats, records) + f"\n{len(records)} runs (scale {args.scale:g}) in " \
      f"{elapsed / 60:.1f} min.\n"
  if pretrain:
    text += (f"Every run started from the pretraining run ({pretrain['step']} steps, mAP "
             f"{100 * pretrain['mAP']:.1f} on its own test split).\n")
  if skipped:
    text += f"Not run (--deadline {args.deadline:g} min): " + ", ".join(
        f"{v} seed {k}" for v, k in skipped) + ".\n"
  (root / "ablation.md").write_text(text)
  (root / "ablation.json").write_text(json.dumps(
      {"scale": args.scale, "config": args.config, "runner": args.runner,
       "seconds": elapsed, "pretrain": pretrain, "runs": records, "stats": stats,
       "skipped": skipped}, indent=2))
  return text, stats


def _run_dir(root: pathlib.Path, variant: str, seed: int) -> pathlib.Path:
  return root / variant.replace(" ", "").replace(",", "_").replace("=", "") / f"seed{seed}"


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--scale", type=float, default=DEFAULT_SCALE,
                      help="Multiplies the demo recipe's epochs (default: "
                           f"{DEFAULT_SCALE}, 34 min on a 2-core CPU; e.g. 20 on a GPU).")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--variants", default=",".join(VARIANTS),
                      help=f"Comma-separated subset of: {', '.join(VARIANTS)}.")
  parser.add_argument("--config", default="", metavar="WORDS",
                      help="Variant words of configs/synthetic.py for every run, e.g. "
                           "parts or parts,study.")
  parser.add_argument("--set", type=parse_set, action="append", default=[],
                      metavar="KEY=VALUE",
                      help="A config field for every run, e.g. dataset.builder_config=large "
                           "or input.image_size=(128,128); repeatable.")
  parser.add_argument("--runner", choices=RUNNERS, default="train",
                      help="train: train.train_and_evaluate on the built dataset; core: "
                           "musp_jax/training/in_memory.py on the set rendered in memory, no "
                           "TensorFlow, tfds, grain or clu.")
  parser.add_argument("--pretrain_scale", type=float, default=0.0,
                      help="> 0: first train configs/synthetic.py:pretrain with its length "
                           "times this, and start every run from it.")
  parser.add_argument("--pretrain_set", type=parse_set, action="append", default=[],
                      metavar="KEY=VALUE", help="A config field of the pretraining run.")
  parser.add_argument("--deadline", type=float, default=0.0, metavar="MINUTES",
                      help="Start no run after this many minutes (0: no limit).")
  parser.add_argument("--dry-run", action="store_true",
                      help="The core runner at tiny shapes (tests).")
  args = parser.parse_args(argv)
  variants = [v.strip() for v in args.variants.split(",") if v.strip()]
  unknown = [v for v in variants if v not in VARIANTS]
  if unknown or not variants:
    parser.error(f"--variants: unknown {unknown}; expected some of {list(VARIANTS)}.")
  if args.seeds < 1 or args.scale <= 0 or args.pretrain_scale < 0 or args.deadline < 0:
    parser.error("--seeds must be >= 1, --scale > 0, --pretrain_scale and --deadline >= 0.")
  overrides, pretrain_overrides = list(args.set), list(args.pretrain_set)
  if args.dry_run:  # tiny shapes whatever else is set
    args.runner = "core"
    overrides, pretrain_overrides = overrides + list(DRY_RUN), pretrain_overrides + list(DRY_RUN)
  try:
    checked = run_config(variants[0], 0, scale=args.scale, overrides=overrides,
                         words=args.config)
    if args.pretrain_scale:
      if checked.model.init_from:
        raise ValueError("--pretrain_scale starts every run from the pretraining run; "
                         "model.init_from must be left empty.")
      run_config(None, 0, scale=args.pretrain_scale, overrides=pretrain_overrides,
                 words="pretrain")
  except (ValueError, KeyError) as e:
    parser.error(str(e).strip("'\""))

  from musp_jax.runtime import process
  process.setup(checked)  # the compilation cache of compilation_cache_dir
  runner = CoreRunner() if args.runner == "core" else train_runner
  root = pathlib.Path(args.workdir).expanduser()
  root.mkdir(parents=True, exist_ok=True)
  records, start = [], time.time()
  pretrain = None
  if args.pretrain_scale:
    config = run_config(None, 0, scale=args.pretrain_scale, overrides=pretrain_overrides,
                        words="pretrain")
    workdir = root / "pretrain"
    t = time.time()
    if not (workdir / "results.json").exists() or not (workdir / "checkpoints").is_dir():
      runner(config, workdir, save=True)
    pretrain = {**read_run(workdir), "seconds": time.time() - t}
    print(f"pretraining ({config.dataset.builder_config}, {pretrain['step']} steps): mAP "
          f"{100 * pretrain['mAP']:.1f} on its own test split ({pretrain['seconds']:.0f} s)",
          flush=True)
    overrides.append(("model.init_from", str(workdir)))
  skipped = []
  for variant, seed in run_order(variants, args.seeds):
    if args.deadline and time.time() - start > 60 * args.deadline:
      skipped.append((variant, seed))
      continue
    config = run_config(variant, seed, scale=args.scale, overrides=overrides,
                        words=args.config)
    workdir = _run_dir(root, variant, seed)
    t = time.time()
    if args.runner == "train" or not (workdir / "results.json").exists():
      runner(config, workdir)
    record = {"variant": variant, "seed": seed, **read_run(workdir),
              "seconds": time.time() - t, "load": os.getloadavg()[0]}
    records.append(record)
    attention = "".join(f", {k} {100 * record[k]:.1f}" if k not in COUNTS else
                        f", {k} {record[k]}" for k in ATTENTION + COUNTS
                        if record.get(k) is not None)
    print(f"{variant}, seed {seed}: mAP {100 * record['mAP']:.1f}, CMC@1 "
          f"{100 * record['CMC@1']:.1f}{attention} ({record['step']} steps, "
          f"{record['seconds']:.0f} s, load {record['load']:.1f})", flush=True)
    # The tables so far: a run stopped from outside still leaves them.
    write_tables(root, args, records, pretrain, skipped, time.time() - start)
  text, stats = write_tables(root, args, records, pretrain, skipped, time.time() - start)
  written = [root / "ablation.md", root / "ablation.json"]
  try:
    figure(stats, records, root / "ablation.png")
    written.append(root / "ablation.png")
  except ImportError as e:  # no matplotlib on a bare GPU image
    print(f"No figure here ({e}).")
  shown = next((v for v in ("MUSP n=5", *variants) if v in variants and v != "baseline"),
               None)
  picture = shown and maps_picture(_run_dir(root, shown, 0), root / "ablation_maps.png")
  if picture:
    written.append(picture)
  print("\n" + text + "\nWritten: " + ", ".join(map(str, written)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
