"""Pictures of a trained model: attention maps and rank lists.

    python -m musp_jax.visualize attention --workdir workdirs/demo [--images a.jpg dir/]
    python -m musp_jax.visualize ranks --workdir workdirs/demo --order worst --topk 8
    python -m musp_jax.visualize demo --workdir workdirs/demo     # all, for `make demo`

attention: one row per image, the image then each attention map laid over it
(the paper's Figure 5); the background map is framed and titled in red. Each
title gives the share of the image the map covers. Without --images, the first
query images of the workdir's evaluation dataset are shown.

On a dataset with ground-truth part masks (synthetic_vehicles), `demo` also draws
attention_parts.png: per row the image, its ground-truth part map, then each
map over the image with the share of its mass on the vehicle in that image
(musp_jax/attention_scores.py defines the scores).

ranks: query images of the evaluation dataset and their top-k gallery images,
after the protocol's junk removal (same id and camera); green frame: same
vehicle, red: another one; distances printed. The choice of queries (worst or
best AP, random, or given indices) is in the file name and the title.

Pictures go to <workdir>/pictures/ unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import Any

import cv2
import jax
import ml_collections
import numpy as np
from etils import epath
from matplotlib import colormaps
from matplotlib import patches
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from musp_jax.training import attention_scores
from musp_jax.data import augment
from musp_jax.training import evaluator
from musp_jax.core import features
from musp_jax.serving import inference
from musp_jax.runtime import writing
from musp_jax.retrieval import ranking
from musp_jax.retrieval import saved_features
from musp_jax.runtime import process

DISPLAY_HEIGHT = 128  # pixels of each picture cell
# Display colours of the ground-truth classes (attention_scores.PART_CLASSES order).
CLASS_COLORS = ("#000000", "#9e9e9e", "#ffd600", "#1e40ff", "#00e5ff", "#e53935",
                "#ff40ff")
MATCH, NON_MATCH, QUERY = "#1a9850", "#d73027", "#2166ac"
ORDERS = ("worst", "best", "random")


# --------------------------------------------------------------------------
# Geometry and colour.


def resize_map(map_hxw: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
  """Bilinear upsampling of an attention map onto an image of `size_hw`.

  Pixel centres are aligned (cell (i, j) of an h x w map covers image rows
  [i H/h, (i+1) H/h) and columns [j W/w, (j+1) W/w)), which is how the model
  sees the image: resizing the input stretches it, so the map stretches the
  same way back.
  """
  h, w = size_hw
  return cv2.resize(np.asarray(map_hxw, np.float32), (w, h), interpolation=cv2.INTER_LINEAR)


def overlay(image_HxWx3: np.ndarray, map_hxw: np.ndarray, *, alpha: float = 0.5,
            cmap: str = "jet") -> np.ndarray:
  """The map (values in [0, 1]) in colour over the image, at the image's size."""
  weights = np.clip(resize_map(map_hxw, image_HxWx3.shape[:2]), 0.0, 1.0)
  heat = colormaps[cmap](weights)[..., :3] * 255.0
  out = (1.0 - alpha) * image_HxWx3.astype(np.float32) + alpha * heat
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def display_image(image_HxWx3: np.ndarray, height: int = DISPLAY_HEIGHT) -> np.ndarray:
  """The image at `height` pixels, its aspect ratio kept."""
  h, w = image_HxWx3.shape[:2]
  width = max(1, int(round(w * height / h)))
  return augment.resize(image_HxWx3, (height, width))


def _figure(rows: int, cols: int, cell_aspects: float) -> Figure:
  cell_h = 1.75  # inches: 128 px pictures at 100 dpi with room for two title lines
  fig = Figure(figsize=(cols * cell_h * cell_aspects + 0.4, rows * cell_h + 0.7), dpi=100)
  FigureCanvasAgg(fig)
  return fig


def _frame(ax, color: str, width: float = 4.0, style: str = "-") -> None:
  ax.add_patch(patches.Rectangle((0, 0), 1, 1, transform=ax.transAxes, fill=False,
                                 edgecolor=color, linewidth=width, linestyle=style,
                                 clip_on=False))


def figure_to_array(fig: Figure) -> np.ndarray:
  """The rendered figure as RGB uint8 (H, W, 3)."""
  fig.canvas.draw()
  return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def _save(fig: Figure, path: str | epath.Path) -> str:
  """Saves atomically: a picture is either the old one or the whole new one."""
  with writing.atomic_file(path) as tmp:
    fig.savefig(tmp, dpi=100)
  return str(path)


def _short(name: str, n: int = 26) -> str:
  return name if len(name) <= n else "..." + name[-(n - 3):]


# --------------------------------------------------------------------------
# Attention grids.


def _image_panel(ax, img: np.ndarray, name: str | None) -> None:
  ax.imshow(img)
  ax.set_title("image", fontsize=10)
  if name is not None:
    ax.set_ylabel(_short(str(name)), fontsize=9)


def _map_panel(ax, img: np.ndarray, map_hxw: np.ndarray, k: int, n: int, share: float,
               detail: str = "") -> None:
  """Map k of n over the image, titled with its share of the image (+ a detail line);
  the last map, the background's, framed in dashes."""
  ax.imshow(overlay(img, map_hxw))
  background = k == n - 1
  title = ("background " if background else f"part {k + 1}  ") + f"{100 * share:.0f}%"
  style = {"color": NON_MATCH} if background else {}
  ax.set_title(title + (f"\n{detail}" if detail else ""), fontsize=9 if detail else 10,
               **style)
  if background:
    _frame(ax, NON_MATCH, width=3.0, style="--")


def attention_figure(images: Sequence[np.ndarray], attention_BxHxWxN: np.ndarray,
                     names: Sequence[str] | None = None) -> Figure:
  """Figure-5-style grid: per row the image, then each map over it.

  Args:
    images: the original RGB uint8 images (any sizes).
    attention_BxHxWxN: the model's maps; the last one is the background.
    names: row labels (file names).
  """
  b, _, _, n = attention_BxHxWxN.shape
  if len(images) != b:
    raise ValueError(f"{len(images)} images but attention for {b}.")
  shown = [display_image(img) for img in images]
  aspect = max(1.0, max(s.shape[1] / s.shape[0] for s in shown))
  fig = _figure(b, n + 1, aspect)
  axes = fig.subplots(b, n + 1, squeeze=False)
  for r, img in enumerate(shown):
    shares = attention_BxHxWxN[r].mean(axis=(0, 1))  # share of the image per map
    for c, ax in enumerate(axes[r]):
      ax.set_xticks([])
      ax.set_yticks([])
      if c == 0:
        _image_panel(ax, img, None if names is None else names[r])
      else:
        _map_panel(ax, img, attention_BxHxWxN[r, :, :, c - 1], c - 1, n, shares[c - 1])
  fig.suptitle("Attention maps (weights 0 to 1, blue to red); % = share of the image",
               fontsize=11)
  fig.tight_layout()
  return fig


def part_map_image(mask_HxW: np.ndarray) -> np.ndarray:
  """A label map in CLASS_COLORS as RGB uint8."""
  palette = np.array([[int(c[i:i + 2], 16) for i in (1, 3, 5)] for c in CLASS_COLORS],
                     np.uint8)
  return palette[np.asarray(mask_HxW)]


def attention_parts_figure(images: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                           attention_BxHxWxN: np.ndarray,
                           names: Sequence[str] | None = None) -> Figure:
  """Per row: the image, its ground-truth part map, then each map over the image.

  Images and part maps are shown stretched to the maps' aspect ratio, which is the
  model's input's: as the model sees them. Each map's title gives its share of the
  image and, in this image, the share of its mass on the vehicle (on the background
  for the background map).
  """
  b, h, w, n = attention_BxHxWxN.shape
  if not len(images) == len(masks) == b:
    raise ValueError(f"{len(images)} images, {len(masks)} masks, attention for {b}.")
  size_hw = (DISPLAY_HEIGHT, max(1, round(DISPLAY_HEIGHT * w / h)))
  shown = [augment.resize(img, size_hw) for img in images]
  fig = _figure(b, n + 2, max(1.0, w / h))
  axes = fig.subplots(b, n + 2, squeeze=False)
  for r, (img, mask) in enumerate(zip(shown, masks)):
    scores = attention_scores.attention_scores(
        attention_BxHxWxN[r:r + 1],
        attention_scores.class_fractions(mask, (h, w))[None])
    for c, ax in enumerate(axes[r]):
      ax.set_xticks([])
      ax.set_yticks([])
      if c == 0:
        _image_panel(ax, img, None if names is None else names[r])
      elif c == 1:
        ax.imshow(cv2.resize(part_map_image(mask), img.shape[1::-1],
                             interpolation=cv2.INTER_NEAREST))
        ax.set_title("ground truth", fontsize=10)
      else:
        k = c - 2
        detail = (f"{100 * scores['background_share'][k]:.0f}% on backgr." if k == n - 1
                  else f"{100 * scores['vehicle_share'][k]:.0f}% on vehicle")
        _map_panel(ax, img, attention_BxHxWxN[r, :, :, k], k, n, scores["area"][k], detail)
  fig.legend(handles=[patches.Patch(color=col, label=name) for col, name in
                      zip(CLASS_COLORS, attention_scores.PART_CLASSES)],
             loc="lower center", ncol=len(CLASS_COLORS), fontsize=9, frameon=False)
  fig.suptitle("Attention maps beside the ground-truth part map; % of the image, and "
               "of each map's mass on the vehicle", fontsize=11)
  fig.tight_layout(rect=(0, 0.04, 1, 1))
  return fig


def _attention_inputs(config: ml_collections.ConfigDict, images: Sequence[np.ndarray]
                      ) -> np.ndarray:
  return np.stack([inference.resize_to_model(config, img) for img in images])


def _attention(model, variables, config: ml_collections.ConfigDict,
               pixels_BxHxWx3: np.ndarray) -> np.ndarray:
  fn = features.jitted_attention(model, config.input.normalize)
  return np.asarray(jax.device_get(fn(variables, pixels_BxHxWx3)))


def _check_attention(config: ml_collections.ConfigDict) -> None:
  if config.model.head != "musp":
    raise ValueError(f"model.head={config.model.head!r} has no attention maps; only "
                     "the 'musp' head does.")


def attention_grid(model, variables, config: ml_collections.ConfigDict,
                   images: Sequence[np.ndarray], names: Sequence[str] | None = None
                   ) -> Figure:
  """Runs the model on RGB uint8 images and draws their attention grid."""
  _check_attention(config)
  attention = _attention(model, variables, config, _attention_inputs(config, images))
  return attention_figure(images, attention, names)


def eval_images(config: ml_collections.ConfigDict, count: int, *, role: str = "query"
                ) -> tuple[list[np.ndarray], list[str]]:
  """The first `count` images of a protocol split of the evaluation dataset (RGB)."""
  source = _eval_source(config, role)
  count = min(count, len(source))
  records = [source[i] for i in range(count)]
  return ([inference.decode_image(r["image"], where=r.get("file_name", str(i)))
           for i, r in enumerate(records)],
          [str(r.get("file_name", i)) for i, r in enumerate(records)])


def eval_attention_grid(model, variables, config: ml_collections.ConfigDict, *,
                        num_images: int = 4) -> np.ndarray:
  """The attention grid of the first evaluation query images, as RGB uint8 (H, W, 3)
  (training writes it to TensorBoard at each evaluation)."""
  images, names = eval_images(config, num_images)
  return figure_to_array(attention_grid(model, variables, config, images, names))


def attention_picture(loaded: inference.LoadedModel, out: str, *,
                      image_paths: Sequence[str] | None = None, num_images: int = 6) -> str:
  """Draws the attention grid of image files (or of evaluation images) into `out`."""
  _check_attention(loaded.config)
  if image_paths:
    files = inference.list_images(image_paths)[:num_images]
    images = [inference.decode_image(epath.Path(p).read_bytes(), where=p) for _, p in files]
    names = [name for name, _ in files]
  else:
    images, names = eval_images(loaded.config, num_images)
  fig = attention_grid(loaded.model, loaded.variables, loaded.config, images, names)
  return _save(fig, out)


def attention_parts_picture(loaded: inference.LoadedModel, out: str, *,
                            num_images: int = 6) -> str:
  """Draws the first query images' maps beside their ground-truth part maps into `out`."""
  _check_attention(loaded.config)
  source = _eval_source(loaded.config, "query")
  records = [source[i] for i in range(min(num_images, len(source)))]
  if not attention_scores.has_part_masks([records]):
    raise ValueError("The evaluation dataset has no ground-truth part masks "
                     f"({attention_scores.MASK_KEY!r}).")
  where = [str(r.get("file_name", i)) for i, r in enumerate(records)]
  images = [inference.decode_image(r["image"], where=n) for r, n in zip(records, where)]
  masks = [attention_scores.decode_mask(r[attention_scores.MASK_KEY], where=n)
           for r, n in zip(records, where)]
  attention = _attention(loaded.model, loaded.variables, loaded.config,
                         _attention_inputs(loaded.config, images))
  return _save(attention_parts_figure(images, masks, attention, where), out)


# --------------------------------------------------------------------------
# Rank lists.


def _eval_source(config: ml_collections.ConfigDict, role: str):
  """The split playing `role` in the evaluation dataset's protocol (built if synthetic)."""
  from musp_jax.data import datasets  # pylint: disable=g-import-not-at-top
  target = datasets.eval_set(config)
  if role not in target.splits:
    raise ValueError(
        f"Dataset {target.name}'s protocol has splits {sorted(target.splits)}, no {role!r}; "
        "pictures need a dataset with query and gallery splits, or give --images.")
  kw = dict(data_dir=config.dataset.data_dir, builder_config=target.builder_config)
  datasets.ensure_built(target.name, manual_dir=config.dataset.manual_dir, **kw)
  return datasets.load_split(target.name, target.splits[role], **kw)


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


def ranks_figure(rows: Sequence[dict[str, Any]], title: str) -> Figure:
  """rows: {"query": img, "label": str, "gallery": [img], "match": [bool], "dist": [float]}."""
  topk = max(len(r["gallery"]) for r in rows)
  fig = _figure(len(rows), topk + 1, 0.9)
  axes = fig.subplots(len(rows), topk + 1, squeeze=False)
  for r, row in enumerate(rows):
    cells = [(row["query"], row["label"], QUERY)] + [
        (img, f"#{i + 1}  d={d:.3f}", MATCH if m else NON_MATCH)
        for i, (img, m, d) in enumerate(zip(row["gallery"], row["match"], row["dist"]))]
    for c, ax in enumerate(axes[r]):
      ax.set_xticks([])
      ax.set_yticks([])
      ax.set_frame_on(False)
      if c >= len(cells):
        continue
      img, text, color = cells[c]
      ax.imshow(display_image(img))
      ax.set_title(text, fontsize=9, color=color if c else "black")
      _frame(ax, color, width=5.0)
  fig.suptitle(title + "\nframe: green = same vehicle, red = another vehicle, "
               "blue = query; d = distance", fontsize=11)
  fig.tight_layout()
  return fig


def ranks_picture(loaded: inference.LoadedModel, out_dir: str, *, order: str = "worst",
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
  _, splits = evaluator.split_features(loaded.model, loaded.variables, config,
                                       process.make_mesh())
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
        "query": inference.decode_image(rec["image"], where=f"query[{q}]"),
        "label": f"query {q}: id {query.ids[q]}{cam}\nAP {ap}",
        "gallery": [inference.decode_image(g_source[int(g)]["image"], where=f"gallery[{g}]")
                    for g in top],
        "match": list(match), "dist": [float(dist_QxG[q, g]) for g in top]})
  if not rows:
    raise ValueError("No query with a true match in the gallery; nothing to draw.")
  path = epath.Path(out_dir) / f"ranks_{order}_top{topk}.png"
  return _save(ranks_figure(rows, title), path)


# --------------------------------------------------------------------------
# Entry points.


def demo_pictures(workdir: str, *, data_dir: str | None = None) -> list[str]:
  """The pictures `make demo` ends with: attention grid, the maps beside the
  ground-truth part maps (datasets with part masks), and worst-AP rank lists."""
  loaded = with_overrides(inference.load(workdir), data_dir=data_dir)
  out_dir = epath.Path(workdir) / "pictures"
  written = []
  if loaded.has_attention:
    written.append(attention_picture(loaded, str(out_dir / "attention.png")))
    if attention_scores.has_part_masks([_eval_source(loaded.config, "query")]):
      written.append(attention_parts_picture(loaded, str(out_dir / "attention_parts.png")))
  written.append(ranks_picture(loaded, str(out_dir), order="worst"))
  return written


def with_overrides(loaded: inference.LoadedModel, *, data_dir: str | None = None,
                   eval_batch_size: int | None = None) -> inference.LoadedModel:
  """The model with its saved config pointing at another data_dir / eval batch size."""
  if data_dir is None and eval_batch_size is None:
    return loaded
  config = ml_collections.ConfigDict(loaded.config.to_dict())
  if data_dir is not None:
    config.dataset.data_dir = data_dir
  if eval_batch_size is not None:
    config.eval.batch_size = eval_batch_size
  return dataclasses.replace(loaded, config=config)


def main(argv: Sequence[str] | None = None) -> int:
  from musp_jax import embed  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(
      prog="python -m musp_jax.visualize", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  att = sub.add_parser("attention", help="Attention maps over images.")
  embed.add_model_args(att)
  att.add_argument("--images", nargs="+", default=None,
                   help="Image files/folders (default: evaluation query images).")
  att.add_argument("--num_images", type=int, default=6)
  att.add_argument("--out", default=None,
                   help="PNG path (default: <workdir>/pictures/attention.png).")
  att.add_argument("--data_dir", default=None, help="Override config.dataset.data_dir.")
  rk = sub.add_parser("ranks", help="Rank lists of evaluation queries.")
  embed.add_model_args(rk)
  rk.add_argument("--order", choices=ORDERS, default="worst")
  rk.add_argument("--queries", type=int, nargs="+", default=None,
                  help="Query indices to show (instead of --order).")
  rk.add_argument("--num_queries", type=int, default=4)
  rk.add_argument("--topk", type=int, default=8)
  rk.add_argument("--seed", type=int, default=0, help="For --order random.")
  rk.add_argument("--out_dir", default=None,
                  help="Folder for ranks_<order>_top<k>.png (default: <workdir>/pictures).")
  rk.add_argument("--data_dir", default=None, help="Override config.dataset.data_dir.")
  rk.add_argument("--batch_size", type=int, default=None,
                  help="Override config.eval.batch_size (a multiple of the device count).")
  demo = sub.add_parser("demo", help="Attention grid + worst-AP rank lists of a workdir.")
  demo.add_argument("--workdir", required=True)
  demo.add_argument("--data_dir", default=None, help="Override config.dataset.data_dir.")
  for sub_parser in (att, rk, demo):
    process.add_verbose_arg(sub_parser)
  args = parser.parse_args(argv)
  process.setup()
  try:
    if args.command == "demo":
      written = demo_pictures(args.workdir, data_dir=args.data_dir)
    else:
      loaded = with_overrides(embed.load_model(args), data_dir=args.data_dir,
                              eval_batch_size=getattr(args, "batch_size", None))
      pictures = epath.Path(loaded.source).parent.parent / "pictures"
      if args.command == "attention":
        written = [attention_picture(
            loaded, args.out or str(pictures / "attention.png"), image_paths=args.images,
            num_images=args.num_images)]
      else:
        written = [ranks_picture(
            loaded, args.out_dir or str(pictures), order=args.order, queries=args.queries,
            num_queries=args.num_queries, topk=args.topk, seed=args.seed)]
  except process.USER_ERRORS as e:
    process.print_error(e, verbose=args.verbose)
    return 2
  print(json.dumps({"written": written}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
