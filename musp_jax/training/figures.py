"""Figures from arrays: attention maps over images, part maps, rank lists (matplotlib).

Nothing here runs a model or reads a dataset (musp_jax/training/model_pictures.py does,
and draws with these):
  attention_figure        per row an image, then each attention map over it (the
                          paper's Figure 5); the background map framed in red dashes
  attention_parts_figure  the same beside each image's ground-truth part map, each map
                          titled with the share of its mass on the vehicle
  ranks_figure            query images and their top-k gallery images, framed green
                          (same vehicle) or red (another one), distances printed
  roc_figure              a verification ROC curve (log FPR) beside the same-id and
                          different-id distance distributions
Pictures are written atomically (`save_figure`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
from matplotlib import colormaps
from matplotlib import patches
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from musp_jax.data import augment
from musp_jax.runtime import writing
from musp_jax.training import attention_scores

DISPLAY_HEIGHT = 128  # pixels of each picture cell
# Display colours of the ground-truth part classes, in their order (class 0: background).
CLASS_COLORS = ("#000000", "#9e9e9e", "#ffd600", "#1e40ff", "#00e5ff", "#e53935",
                "#ff40ff")
MATCH, NON_MATCH, QUERY = "#1a9850", "#d73027", "#2166ac"


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


def save_figure(fig: Figure, path: str | os.PathLike) -> str:
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
                           attention_BxHxWxN: np.ndarray, classes: Sequence[str],
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
    scores = attention_scores.score_maps(
        attention_BxHxWxN[r:r + 1],
        attention_scores.class_fractions(mask, (h, w), len(classes))[None])
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
                      zip(CLASS_COLORS, classes)],
             loc="lower center", ncol=len(classes), fontsize=9, frameon=False)
  fig.suptitle("Attention maps beside the ground-truth part map; % of the image, and "
               "of each map's mass on the vehicle", fontsize=11)
  fig.tight_layout(rect=(0, 0.04, 1, 1))
  return fig


# --------------------------------------------------------------------------
# Rank lists.


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


# --------------------------------------------------------------------------
# Verification.


def roc_figure(result: dict[str, Any], *, title: str = "") -> Figure:
  """The ROC curve (log FPR) and the two distance distributions, from
  `verification.roc`'s result (its curve at bin resolution, the positives' distances
  and the negatives' histogram)."""
  fig = Figure(figsize=(11, 4.5))
  FigureCanvasAgg(fig)
  ax_roc, ax_hist = fig.subplots(1, 2)
  curve = result["curve"]
  ax_roc.step(np.maximum(curve["fpr"], 1e-9), curve["tpr"], where="post", lw=1.5)
  for f, tpr in result["tpr_at_fpr"].items():
    ax_roc.plot(float(f), tpr, "o", color="C3")
    ax_roc.annotate(f"{tpr:.3f}", (float(f), tpr), textcoords="offset points",
                    xytext=(4, -12), fontsize=8)
  ax_roc.plot(result["eer"], 1 - result["eer"], "s", color="C2",
              label=f"EER {result['eer']:.4f}")
  ax_roc.set_xscale("log")
  ax_roc.set_xlim(max(1.0 / result["num_negative"], 1e-7), 1.0)
  ax_roc.set_ylim(0.0, 1.01)
  ax_roc.set_xlabel("false positive rate (negative pairs accepted)")
  ax_roc.set_ylabel("true positive rate (positive pairs accepted)")
  ax_roc.grid(True, which="both", alpha=0.3)
  ax_roc.legend(loc="lower right")
  neg = result["negative_histogram"]
  pos = result["positive_distances"]
  finite = np.isfinite(neg["distance"])
  top = float(max(np.max(pos), np.max(neg["distance"][finite], initial=0.0)))
  bottom = float(min(np.min(pos), np.min(neg["distance"][finite], initial=top)))
  edges = np.linspace(bottom, top, 81)
  neg_counts, _ = np.histogram(neg["distance"][finite], edges,
                               weights=neg["count"][finite])
  pos_counts, _ = np.histogram(pos, edges)
  width = np.diff(edges)
  ax_hist.bar(edges[:-1], neg_counts / neg_counts.sum() / width, width, align="edge",
              alpha=0.5, label=f"different id ({result['num_negative']:,} pairs)")
  ax_hist.bar(edges[:-1], pos_counts / pos_counts.sum() / width, width, align="edge",
              alpha=0.5, label=f"same id ({result['num_positive']:,} pairs)")
  ax_hist.axvline(result["threshold"], color="C3", ls="--",
                  label=f"threshold @ FPR {result['target_fpr']:.0e}")
  ax_hist.set_xlabel("distance")
  ax_hist.set_ylabel("density")
  ax_hist.legend(fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return fig
