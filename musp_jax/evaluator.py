"""Model -> features -> protocol results: the glue between the model and retrieval.

Features are each branch's pre-BN feature, L2-normalised (SPEC section 4), extracted with
fixed-shape, padded batches sharded over the mesh, then handed to musp_jax.protocols.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from musp_jax import datasets
from musp_jax import input_pipeline
from musp_jax import protocols
from musp_jax import retrieval

ROW_METRICS = ("mAP", "CMC@1", "CMC@5", "CMC@10", "mINP")


def embed(variables, images, *, model, flip: bool) -> tuple[jax.Array, jax.Array]:
  """Images -> (L2-normalised per-branch features (B,P,C), areas (B,P)); flip-averaged
  (SPEC section 4) when `flip`. All-zero (padded) branches stay zero."""
  out = model.apply(variables, images, train=False)
  feats = retrieval.l2_normalize(out["feats"].astype(jnp.float32))
  if flip:
    flipped = model.apply(variables, images[:, :, ::-1, :], train=False)["feats"]
    feats = retrieval.l2_normalize(feats + retrieval.l2_normalize(flipped.astype(jnp.float32)))
  return feats, out["areas"].astype(jnp.float32)


def extract_features(model, variables, source, config: ml_collections.ConfigDict, mesh, *,
                     desc: str = "features") -> dict[str, np.ndarray]:
  """Runs the model over a whole split -> {"feats": (N,P,C), "areas": (N,P)} in order."""
  batch_sharding = NamedSharding(mesh, P("data"))
  embed_fn = jax.jit(functools.partial(embed, model=model, flip=config.eval.flip),
                     in_shardings=(NamedSharding(mesh, P()), batch_sharding))
  feats = areas = None
  batches = input_pipeline.eval_batches(
      source, config.input, batch_size=config.eval.batch_size,
      process_index=jax.process_index(), process_count=jax.process_count())
  total = -(-len(source) // config.eval.batch_size)
  for batch in tqdm.tqdm(batches, total=total, desc=desc, leave=False,
                         disable=jax.process_index() > 0):
    f, a = embed_fn(variables, input_pipeline.device_put_batch(batch["image"], batch_sharding))
    keep, index = batch["mask"], batch["index"]
    if jax.process_count() > 1:
      # Each process fed its rows; every process gathers the whole batch.
      f, a = multihost_utils.process_allgather((f, a))
      keep, index = multihost_utils.process_allgather((keep, index), tiled=True)
    f, a = np.asarray(f), np.asarray(a)
    if feats is None:
      feats = np.zeros((len(source), *f.shape[1:]), np.float32)
      areas = np.zeros((len(source), *a.shape[1:]), np.float32)
    keep = np.asarray(keep, bool)
    feats[index[keep]] = f[keep]
    areas[index[keep]] = a[keep]
  batches.close()
  return {"feats": feats, "areas": areas}


def evaluate(model, variables, config: ml_collections.ConfigDict, mesh) -> dict:
  """Evaluates on config.eval.dataset (default: the training dataset) by its protocol."""
  name = config.eval.dataset or config.dataset.name
  builder_config = config.eval.builder_config or (
      config.dataset.builder_config if name == config.dataset.name else "")
  kw = dict(data_dir=config.dataset.data_dir, builder_config=builder_config)
  datasets.ensure_built(name, manual_dir=config.dataset.manual_dir, **kw)
  splits = {}
  for split in (s for s in datasets.SPLITS[name] if s != "train"):
    source = datasets.load_split(name, split, **kw)
    splits[split] = {**extract_features(model, variables, source, config, mesh, desc=split),
                     **datasets.split_index(name, split, **kw)}
  return protocols.evaluate_dataset(name, splits, config.eval, builder_config=builder_config)


def primary_map(rows: dict) -> float:
  """The mAP used to pick the best checkpoint: the first row of the protocol."""
  return float(next(iter(rows.values()))["mAP"])


def flat_scalars(rows: dict) -> dict[str, float]:
  return {f"eval/{name}/{k}": float(row[k]) for name, row in rows.items()
          for k in ROW_METRICS if k in row}


def markdown_table(results: dict, *, title: str | None = None) -> str:
  """A results table as the paper reports it (metrics in %); `title` replaces the
  "Results at step N" line."""
  head = title or f"Results at step {results.get('step', '?')}"
  if "epoch" in results and title is None:
    head += f" (epoch {results['epoch']:.1f})"
  lines = [head, "", "| test set | " + " | ".join(ROW_METRICS) + " | queries |",
           "|---" * (len(ROW_METRICS) + 2) + "|"]
  for name, row in results.get("results", {}).items():
    cells = [f"{100 * row[k]:.2f}" if k in row else "-" for k in ROW_METRICS]
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {row.get('num_queries', '-')} |")
  return "\n".join(lines) + "\n"
