"""Pictures of a model on its evaluation data: attention maps and rank lists.

The functions run the model (core/features.py) on images of the evaluation dataset's
protocol splits, or on images given, pick what to show and draw it with
musp_jax/training/figures.py:
  attention_picture        per image, each attention map over it; without images, the
                           first query images (training logs this grid to TensorBoard
                           at each evaluation: `eval_attention_grid`)
  attention_parts_picture  the maps beside the ground-truth part maps, on a dataset
                           that has them (synthetic_vehicles); scores in
                           musp_jax/training/attention_scores.py
  ranks_picture            query images and their top-k gallery images after the
                           protocol's junk removal (same id and camera), for the worst
                           or best AP, random, or given queries
`loaded` is a model loaded for the tools (musp_jax.serving.inference.LoadedModel):
its config, model, variables and step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from musp_jax.core import features
from musp_jax.data import augment
from musp_jax.data import datasets
from musp_jax.retrieval import ranking
from musp_jax.retrieval import saved_features
from musp_jax.runtime import process
from musp_jax.training import attention_scores
from musp_jax.training import evaluator
from musp_jax.training import figures

ORDERS = ("worst", "best", "random")


# --------------------------------------------------------------------------
# Attention.


def _attention_inputs(config: ml_collections.ConfigDict, images: Sequence[np.ndarray]
                      ) -> np.ndarray:
  return np.stack([augment.resize(img, tuple(config.input.image_size)) for img in images])


def _attention(model, variables, config: ml_collections.ConfigDict,
               pixels_BxHxWx3: np.ndarray) -> np.ndarray:
  fn = features.jitted_attention(model, config.input.normalize)
  return np.asarray(jax.device_get(fn(variables, pixels_BxHxWx3)))


def require_attention(config: ml_collections.ConfigDict) -> None:
  """Raises a ValueError naming the head if the model has no attention maps."""
  if config.model.head != "musp":
    raise ValueError(f"model.head={config.model.head!r} has no attention maps; only "
                     "the 'musp' head does.")


def attention_grid(model, variables, config: ml_collections.ConfigDict,
                   images: Sequence[np.ndarray], names: Sequence[str] | None = None
                   ) -> figures.Figure:
  """Runs the model on RGB uint8 images and draws their attention grid."""
  require_attention(config)
  attention = _attention(model, variables, config, _attention_inputs(config, images))
  return figures.attention_figure(images, attention, names)


def _eval_target(config: ml_collections.ConfigDict) -> datasets.EvalSet:
  """The dataset pictures show: the first evaluation dataset."""
  return datasets.eval_sets(config)[0]


def _eval_source(config: ml_collections.ConfigDict, role: str):
  """The split playing `role` in the evaluation dataset's protocol (built if synthetic)."""
  target = _eval_target(config)
  if role not in target.splits:
    raise ValueError(
        f"Dataset {target.name}'s protocol has splits {sorted(target.splits)}, no {role!r}; "
        "pictures need a dataset with query and gallery splits, or give --images.")
  target.entry.ensure_built(config.dataset.data_dir, config.dataset.manual_dir)
  return target.entry.load_split(target.splits[role], config.dataset.data_dir)


def eval_images(config: ml_collections.ConfigDict, count: int, *, role: str = "query"
                ) -> tuple[list[np.ndarray], list[str]]:
  """The first `count` images of a protocol split of the evaluation dataset (RGB)."""
  source = _eval_source(config, role)
  count = min(count, len(source))
  records = [source[i] for i in range(count)]
  return ([augment.decode(r["image"], where=r.get("file_name", str(i)))
           for i, r in enumerate(records)],
          [str(r.get("file_name", i)) for i, r in enumerate(records)])


def eval_attention_grid(model, variables, config: ml_collections.ConfigDict, *,
                        num_images: int = 4) -> np.ndarray:
  """The attention grid of the first evaluation query images, as RGB uint8 (H, W, 3)
  (training writes it to TensorBoard at each evaluation)."""
  images, names = eval_images(config, num_images)
  return figures.figure_to_array(attention_grid(model, variables, config, images, names))


def attention_picture(loaded: Any, out: str, *, images: Sequence[np.ndarray] | None = None,
                      names: Sequence[str] | None = None, num_images: int = 6) -> str:
  """Draws the attention grid of `images` (RGB uint8; default: the first evaluation
  query images) into `out`."""
  require_attention(loaded.config)
  if images is None:
    images, names = eval_images(loaded.config, num_images)
  fig = attention_grid(loaded.model, loaded.variables, loaded.config, images, names)
  return figures.save_figure(fig, out)


def attention_parts_picture(loaded: Any, out: str, *,
                            num_images: int = 6) -> str:
  """Draws the first query images' maps beside their ground-truth part maps into `out`."""
  require_attention(loaded.config)
  source = _eval_source(loaded.config, "query")
  records = [source[i] for i in range(min(num_images, len(source)))]
  if not attention_scores.has_part_masks([records]):
    raise ValueError("The evaluation dataset has no ground-truth part masks "
                     f"({attention_scores.MASK_KEY!r}).")
  where = [str(r.get("file_name", i)) for i, r in enumerate(records)]
  images = [augment.decode(r["image"], where=n) for r, n in zip(records, where)]
  masks = [attention_scores.decode_mask(r[attention_scores.MASK_KEY], where=n)
           for r, n in zip(records, where)]
  attention = _attention(loaded.model, loaded.variables, loaded.config,
                         _attention_inputs(loaded.config, images))
  classes = datasets.part_classes(_eval_target(loaded.config).entry.table)
  return figures.save_figure(
      figures.attention_parts_figure(images, masks, attention, classes, where), out)


# --------------------------------------------------------------------------
# Rank lists.


def choose_queries(aps: np.ndarray, order: str, count: int, *, seed: int = 0) -> np.ndarray:
  """Indices of the `count` worst/best-AP or random valid queries."""
  valid = np.flatnonzero(~np.isnan(aps))
  if order == "random":
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(valid, size=min(count, len(valid)), replace=False))
  if order not in ("worst", "best"):
    raise ValueError(f"order={order!r}; expected one of {ORDERS}.")
  # Stable: equal APs keep query order.
  ranked = valid[np.argsort(aps[valid] if order == "worst" else -aps[valid], kind="stable")]
  return ranked[:count]


def ranked_list(dist_G: np.ndarray, query_id: int, query_cam: int,
                gallery: saved_features.Features, topk: int) -> tuple[np.ndarray, np.ndarray]:
  """Top-k gallery indices after junk removal (same id and camera), and whether each
  is a true match: the list the per-query AP was computed on."""
  order = np.argsort(dist_G, kind="stable")
  same = gallery.ids[order] == query_id
  order = order[~(same & (gallery.cams[order] == query_cam))]
  order = order[:topk]
  return order, gallery.ids[order] == query_id


def ranks_picture(loaded: Any, out_dir: str, *, order: str = "worst",
                  queries: Sequence[int] | None = None, num_queries: int = 4,
                  topk: int = 8, seed: int = 0) -> str:
  """Embeds the evaluation query/gallery splits and draws chosen queries' rank lists.

  Returns the path of the written PNG: ranks_<order>_top<k>.png, or
  ranks_chosen_top<k>.png for explicit `queries`.
  """
  if queries is None and order not in ORDERS:
    raise ValueError(f"order={order!r}; expected one of {ORDERS}.")
  config = loaded.config
  q_source, g_source = _eval_source(config, "query"), _eval_source(config, "gallery")
  splits = evaluator.split_features(loaded.model, loaded.variables, config,
                                    process.make_mesh(), _eval_target(config))
  query, gallery = splits["query"], splits["gallery"]
  distance = config.eval.distance
  if distance not in ranking.DISTANCES:
    raise ValueError(f"eval.distance={distance!r}; expected one of {ranking.DISTANCES}.")
  dist_QxG = ranking.distance_matrix(query, gallery, distance=distance,
                                       query_block=min(len(query), 256))
  # Per-query AP by the protocol's junk rule, from the exact device ranking.
  aps = ranking.rank_distmat(dist_QxG, query.ids, gallery.ids, query.cams, gallery.cams,
                               remove_junk=True, per_query=True)["per_query"]["AP"]
  if queries is not None:
    bad = [q for q in queries if not 0 <= q < len(query)]
    if bad:
      raise ValueError(f"Query indices {bad} out of range: the query split has "
                       f"{len(query)} images.")
    chosen, order = np.asarray(queries, int), "chosen"
    title = f"Chosen queries {list(chosen)}"
  else:
    chosen = choose_queries(aps, order, num_queries, seed=seed)
    what = {"worst": "Worst-AP", "best": "Best-AP", "random": f"Random (seed {seed})"}
    title = (f"{what[order]} queries: {len(chosen)} of {int(np.sum(~np.isnan(aps)))}"
             + (", lowest AP first" if order == "worst" else
                ", highest AP first" if order == "best" else ""))
  title += f"; top-{topk}, {distance} distance, step {loaded.step}"
  rows = []
  for q in chosen:
    top, match = ranked_list(dist_QxG[q], query.ids[q], query.cams[q], gallery, topk)
    rec = q_source[int(q)]
    ap = "n/a" if np.isnan(aps[q]) else f"{aps[q]:.2f}"
    cam = f" cam {query.cams[q]}" if query.cams[q] >= 0 else ""
    rows.append({
        "query": augment.decode(rec["image"], where=f"query[{q}]"),
        "label": f"query {q}: id {query.ids[q]}{cam}\nAP {ap}",
        "gallery": [augment.decode(g_source[int(g)]["image"], where=f"gallery[{g}]")
                    for g in top],
        "match": list(match), "dist": [float(dist_QxG[q, g]) for g in top]})
  if not rows:
    raise ValueError("No query with a true match in the gallery; nothing to draw.")
  path = epath.Path(out_dir) / f"ranks_{order}_top{topk}.png"
  return figures.save_figure(figures.ranks_figure(rows, title), path)


# --------------------------------------------------------------------------
# All of them.


def demo_pictures(loaded: Any, out_dir: str) -> list[str]:
  """The pictures `make demo` ends with, written into `out_dir`: attention grid, the maps
  beside the ground-truth part maps (datasets with part masks), worst-AP rank lists."""
  out_dir = epath.Path(out_dir)
  written = []
  if loaded.has_attention:
    written.append(attention_picture(loaded, str(out_dir / "attention.png")))
    if attention_scores.has_part_masks([_eval_source(loaded.config, "query")]):
      written.append(attention_parts_picture(loaded, str(out_dir / "attention_parts.png")))
  written.append(ranks_picture(loaded, str(out_dir), order="worst"))
  return written
