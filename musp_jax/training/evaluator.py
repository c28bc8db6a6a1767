"""Model -> features -> protocol results, and the results files.

Features (`features.embed`) are extracted with fixed-shape, padded batches sharded over
the mesh, then handed to each evaluation dataset's protocol (datasets.EvalSet). The
results of an evaluation are written as results.json plus the same table in markdown.
Rows are named by dataset first ("veri776", "vehicle_id_small/random10"), so the rows
of one dataset form a block (`dataset_blocks`); TensorBoard gets eval/<row>/<metric>.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from musp_jax.training import attention_scores
from musp_jax.data import datasets
from musp_jax.core import features
from musp_jax.data import input_pipeline
from musp_jax.retrieval import protocols
from musp_jax.retrieval import saved_features

ROW_METRICS = ("mAP", "CMC@1", "CMC@5", "CMC@10", "mINP")


def apply_to_split(fn, variables, source, config: ml_collections.ConfigDict, mesh, *,
                   desc: str) -> tuple[np.ndarray, ...]:
  """Runs `fn(variables, uint8 images)` over a whole split -> each of its outputs as
  (N, ...) float32 in record order.

  Test transform, fixed-shape padded batches of config.eval.batch_size sharded over
  the mesh (grain workers); every process ends with every row.
  """
  batch_sharding = NamedSharding(mesh, P("data"))
  variables = jax.device_put(variables, NamedSharding(mesh, P()))  # no copy if already
  outs = None
  batches = input_pipeline.eval_batches(
      source, config.input, batch_size=config.eval.batch_size,
      process_index=jax.process_index(), process_count=jax.process_count())
  total = input_pipeline.num_eval_batches(len(source), config.eval.batch_size)
  for batch in tqdm.tqdm(batches, total=total, desc=desc, leave=False,
                         disable=jax.process_index() > 0):
    ys = fn(variables, input_pipeline.device_put_batch(batch["image"], batch_sharding))
    ys = ys if isinstance(ys, tuple) else (ys,)
    keep, index = batch["mask"], batch["index"]
    if jax.process_count() > 1:
      # Each process fed its rows; every process gathers the whole batch.
      ys = multihost_utils.process_allgather(ys)
      keep, index = multihost_utils.process_allgather((keep, index), tiled=True)
    ys = [np.asarray(y) for y in ys]
    if outs is None:
      outs = [np.zeros((len(source), *y.shape[1:]), np.float32) for y in ys]
    keep = np.asarray(keep, bool)
    for out, y in zip(outs, ys):
      out[index[keep]] = y[keep]
  batches.close()
  return tuple(outs)


def extract_features(model, variables, source, config: ml_collections.ConfigDict, mesh, *,
                     desc: str = "features") -> dict[str, np.ndarray]:
  """Runs the model over a whole split -> {"feats": (N,P,C), "areas": (N,P)} in order."""
  embed_fn = features.jitted_embed(model, bool(config.eval.flip), config.input.normalize)
  feats, areas = apply_to_split(embed_fn, variables, source, config, mesh, desc=desc)
  return {"feats": feats, "areas": areas}


def attention_row(model, variables, sources, config: ml_collections.ConfigDict, mesh, *,
                  classes: tuple[str, ...]) -> dict:
  """A MUSP model's attention on the splits' images, scored against their ground-truth
  part masks, whose values `classes` names (attention_scores; JSON-ready)."""
  attention_fn = features.jitted_attention(model, config.input.normalize)
  maps = [apply_to_split(attention_fn, variables, source, config, mesh, desc="attention")[0]
          for source in sources]
  return attention_scores.score_splits(np.concatenate(maps), sources, classes)


def split_features(model, variables, config: ml_collections.ConfigDict, mesh,
                   target: datasets.EvalSet) -> dict[str, saved_features.Features]:
  """An evaluation dataset's protocol splits as Features, by protocol role."""
  data_dir = config.dataset.data_dir
  target.entry.ensure_built(data_dir, config.dataset.manual_dir)
  out = {}
  for role, split in target.splits.items():
    source = target.entry.load_split(split, data_dir)
    f = extract_features(model, variables, source, config, mesh,
                         desc=f"{target.name}/{split}")
    index = target.entry.split_index(split, data_dir)
    out[role] = saved_features.Features(f["feats"], f["areas"], index["vehicle_id"],
                                   index["camera_id"])
  return out


def evaluate_model(model, variables, config: ml_collections.ConfigDict, mesh) -> dict:
  """Evaluates on each dataset of config.eval.dataset (default: the training datasets)
  by its protocol: {row name: row}, one block of rows per dataset, in order."""
  rows, attention = {}, {}
  for target in datasets.eval_sets(config):
    splits = split_features(model, variables, config, mesh, target)
    rows.update(protocols.run_protocol(target.protocol, splits, name=target.row_name,
                                       eval_config=config.eval))
    # Attention maps scored against ground-truth part masks, for a dataset that has
    # them (synthetic_vehicles): one more row, musp_jax/attention_scores.py.
    if config.model.head == "musp" and not attention:
      sources = [target.entry.load_split(split, config.dataset.data_dir)
                 for split in target.splits.values()]
      if attention_scores.has_part_masks(sources):
        attention[attention_scores.ROW] = attention_row(
            model, variables, sources, config, mesh,
            classes=datasets.part_classes(target.entry.table))
  return {**rows, **attention}


def dataset_blocks(rows: dict) -> dict[str, list[str]]:
  """Row names by evaluated dataset (a row's name up to its first "/"), in order; the
  attention row is not a dataset's."""
  blocks: dict[str, list[str]] = {}
  for name in rows:
    if name != attention_scores.ROW:
      blocks.setdefault(name.split("/")[0], []).append(name)
  return blocks


def primary_map(rows: dict) -> float:
  """The mAP used to pick the best checkpoint: the mean over the evaluated datasets of
  the first row of each one's protocol (with one dataset, that row's mAP)."""
  return float(np.mean([float(rows[names[0]]["mAP"])
                        for names in dataset_blocks(rows).values()]))


def tensorboard_scalars(rows: dict) -> dict[str, float]:
  out = {f"eval/{name}/{k}": float(row[k]) for name, row in rows.items()
         for k in ROW_METRICS if k in row}
  if attention_scores.ROW in rows:
    out.update(attention_scores.attention_scalars(rows[attention_scores.ROW]))
  return out


def markdown_table(results: dict, *, title: str | None = None) -> str:
  """A results table as the paper reports it (metrics in %); `title` replaces the
  "Results at step N" line."""
  head = title or f"Results at step {results.get('step', '?')}"
  if "epoch" in results and title is None:
    head += f" (epoch {results['epoch']:.1f})"
  rows = dict(results.get("results", {}))
  attention = rows.pop(attention_scores.ROW, None)
  blocks = dataset_blocks(rows)
  lines = [head]
  for dataset, names in blocks.items():
    lines += ["", f"{dataset}:", ""] if len(blocks) > 1 else [""]
    lines += ["| test set | " + " | ".join(ROW_METRICS) + " | queries |",
              "|---" * (len(ROW_METRICS) + 2) + "|"]
    for name in names:
      row = rows[name]
      cells = [f"{100 * row[k]:.2f}" if k in row else "-" for k in ROW_METRICS]
      lines.append(f"| {name} | " + " | ".join(cells)
                   + f" | {row.get('num_queries', '-')} |")
  if attention is not None:
    lines += ["", attention_scores.markdown(attention)]
  return "\n".join(lines).rstrip("\n") + "\n"


def read_results(workdir: epath.Path, name: str = "results") -> dict[str, Any]:
  path = epath.Path(workdir) / f"{name}.json"
  return json.loads(path.read_text()) if path.exists() else {}


def write_results(workdir: epath.Path, results: dict, name: str = "results") -> None:
  """<name>.json plus the markdown table; written atomically so a kill never truncates."""
  if jax.process_index() > 0:
    return
  workdir = epath.Path(workdir)
  for suffix, text in ((".json", json.dumps(results, indent=2)),
                       (".md", markdown_table(results))):
    tmp = workdir / f".{name}{suffix}.tmp"
    tmp.write_text(text)
    tmp.replace(workdir / f"{name}{suffix}")
