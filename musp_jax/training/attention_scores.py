"""MUSP attention maps scored against ground-truth part masks.

The synthetic vehicles come with a label map per image (their builder's PART_CLASSES,
musp_jax/data/datasets.py `part_classes`: background, body, lamps, wheels, windows,
roof item, sticker/stripe; class 0 is always the background), so what
the paper could only show in pictures (Figures 1, 3, 5: the soft partition finds
the vehicle, separates its parts, the background prototype takes the background)
can be measured.

Maps and masks meet at the maps' resolution. The model sees the image resized
(stretched) to its input size, so cell (i, j) of an h x w map covers image rows
[i H/h, (i+1) H/h) and columns [j W/w, (j+1) W/w); a label map becomes, per
cell, the fraction of that region each class covers (`class_fractions`).

With A (N images, h, w, n maps; the last is the background prototype, maps sum
to 1 at each cell) and G (N, h, w, C class fractions, summing to 1 at each
cell), sums running over images and cells (`score_maps`):

  area[k]           mean of A_k: the share of the image map k takes.
  mass_share[k, c]  sum A_k G_c / sum A_k: the share of map k's attention mass
                    on class c (pooled over the split; a row sums to 1).
                    background_share[k] = mass_share[k, background];
                    vehicle_share[k] = 1 - background_share[k].
  iou[k, c]         sum min(A_k, G_c) / sum max(A_k, G_c): the mass-weighted IoU
                    (weighted Jaccard) of map k with class c. It is 1 exactly
                    when the map equals the class's fractions everywhere, and
                    reduces to the usual IoU for 0/1 maps and masks.
  best_part[k]      the vehicle class (body or a part family) of highest iou[k].
  image_dependence[k]  the share of map k's variance over (image, cell) that is
                    between images: 1 - sum_b sum_ij (mean_b A_k - mean A_k)^2
                    / sum_b sum_ij (A_k - mean A_k)^2, i.e. 1 - (variance of the
                    split's mean map over cells) / (total variance). A map that is
                    the same for every image (a positional prior that ignores the
                    image) scores 0, a map whose mean over the split is flat but
                    that moves with the content scores 1; a constant map scores 0.
                    Undefined (NaN) for a dead map (area below DEAD_AREA): what
                    little it holds is noise, and noise is all between images.
  background_taken  sum A_bg G_background / sum G_background: the share of the
                    background pixels the background prototype takes.

Summaries: parts_on_vehicle (the kept maps' pooled mass share on the vehicle),
background_on_background (background_share's complement for the background map:
its mass share on background; None when the map is dead, i.e. its area is below
DEAD_AREA), background_taken, image_dependence (mean over the maps that are not
dead), part_iou
(mean over kept maps of their best IoU) and distinct_parts (how many different
best parts the kept maps have).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import cv2
import numpy as np

ROW = "attention vs part masks"  # the name of the scores' entry among the result rows
MASK_KEY = "part_mask"  # the record field holding the PNG label map
DEAD_AREA = 1e-3  # a map with less than this share of the image counts as dead
SUMMARY = ("parts_on_vehicle", "background_on_background", "background_taken",
           "image_dependence", "part_iou", "distinct_parts")


def _overlap_matrix(size: int, cells: int) -> np.ndarray:
  """(cells, size): the share of cell i's extent [i s, (i+1) s), s = size/cells, that
  pixel r = [r, r+1) covers; each row sums to 1."""
  step = size / cells
  lo = np.arange(cells)[:, None] * step
  r = np.arange(size)[None, :]
  overlap = np.clip(np.minimum(lo + step, r + 1) - np.maximum(lo, r), 0.0, None)
  return overlap / step


def class_fractions(mask_HxW: np.ndarray, grid_hw: tuple[int, int],
                    num_classes: int) -> np.ndarray:
  """(h, w, C) float32: per map cell, the fraction of its image region in each class.

  Exact area averaging of the one-hot label map over each cell's region (cells
  need not align with pixels).
  """
  mask_HxW = np.asarray(mask_HxW)
  if mask_HxW.ndim != 2:
    raise ValueError(f"Label map must be (H, W), got shape {mask_HxW.shape}.")
  if mask_HxW.size and mask_HxW.max() >= num_classes:
    raise ValueError(f"Label map holds class {int(mask_HxW.max())}; expected values "
                     f"below {num_classes}, the dataset's number of part classes.")
  h, w = grid_hw
  onehot_HxWxC = np.eye(num_classes, dtype=np.float64)[mask_HxW]
  rows_hxH = _overlap_matrix(mask_HxW.shape[0], h)
  cols_wxW = _overlap_matrix(mask_HxW.shape[1], w)
  return np.einsum("ir,rsc,js->ijc", rows_hxH, onehot_HxWxC, cols_wxW).astype(np.float32)


def decode_mask(data: bytes, *, where: str) -> np.ndarray:
  """PNG bytes -> (H, W) uint8 label map, or a ValueError naming `where`."""
  mask = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
  if mask is None or mask.ndim != 2:
    raise ValueError(f"{where}: {MASK_KEY} is not a single-channel PNG label map "
                     f"({len(data)} bytes).")
  return mask


def score_maps(attention_NxHxWxK: np.ndarray, fractions_NxHxWxC: np.ndarray
                     ) -> dict[str, Any]:
  """The scores of the module docstring, as numpy arrays and floats.

  Args:
    attention_NxHxWxK: the maps of N images, the last one the background prototype.
    fractions_NxHxWxC: class fractions per cell (`class_fractions`), class 0 the
      background.
  """
  a = np.asarray(attention_NxHxWxK, np.float64)
  g = np.asarray(fractions_NxHxWxC, np.float64)
  if a.ndim != 4 or g.ndim != 4 or a.shape[:3] != g.shape[:3]:
    raise ValueError(f"attention {a.shape} and fractions {g.shape} must be (N, h, w, n) "
                     "and (N, h, w, C) with the same N, h, w.")
  n, c = a.shape[-1], g.shape[-1]
  if n < 2:
    raise ValueError(f"Need n >= 2 maps (the last is the background), got {n}.")
  a_XxK, g_XxC = a.reshape(-1, n), g.reshape(-1, c)
  mass_K = a_XxK.sum(0)
  joint_KxC = a_XxK.T @ g_XxC
  mass_share = joint_KxC / np.maximum(mass_K, 1e-12)[:, None]
  a_Xx1xK, g_XxCx1 = a_XxK[:, None, :], g_XxC[:, :, None]
  iou = (np.minimum(a_Xx1xK, g_XxCx1).sum(0)
         / np.maximum(np.maximum(a_Xx1xK, g_XxCx1).sum(0), 1e-12)).T
  best_part = 1 + np.argmax(iou[:, 1:], axis=1)
  area = a.mean(axis=(0, 1, 2))
  # Variance of A_k over (image, cell), and that of the split's mean map over cells.
  total_var = a.var(axis=(0, 1, 2))
  positional_var = a.mean(axis=0).var(axis=(0, 1))
  image_dependence = np.where(total_var > 1e-12,
                              1.0 - positional_var / np.maximum(total_var, 1e-12), 0.0)
  alive = area >= DEAD_AREA  # the maps sum to 1 at each cell, so one at least is alive
  image_dependence = np.where(alive, image_dependence, math.nan)
  bg_area = g_XxC[:, 0].sum()
  kept_mass = mass_K[:-1].sum()
  return {
      "area": area,
      "mass_share": mass_share,
      "background_share": mass_share[:, 0],
      "vehicle_share": 1.0 - mass_share[:, 0],
      "iou": iou,
      "best_part": best_part,
      "image_dependence": image_dependence,
      "parts_on_vehicle": float(1.0 - joint_KxC[:-1, 0].sum() / max(kept_mass, 1e-12)),
      "background_on_background": float(mass_share[-1, 0]) if alive[-1] else math.nan,
      "background_taken": float(joint_KxC[-1, 0] / bg_area) if bg_area > 0 else math.nan,
      "image_dependence_mean": float(image_dependence[alive].mean()),
      "part_iou": float(iou[np.arange(n - 1), best_part[:-1]].mean()),
      "distinct_parts": int(len(set(best_part[:-1].tolist()))),
  }


def _clean(x: float) -> float | None:
  return None if math.isnan(x) else float(x)


def to_row(scores: dict[str, Any], num_images: int, classes: Sequence[str]
           ) -> dict[str, Any]:
  """JSON-ready scores: summaries, then one entry per map (undefined values: None;
  a map whose area is below DEAD_AREA has no shares); `classes` names the classes."""
  n = len(scores["area"])
  prototypes = []
  for k in range(n):
    alive = scores["area"][k] >= DEAD_AREA  # a dead map's shares are undefined
    prototypes.append({
        "name": "background" if k == n - 1 else f"part {k + 1}",
        "area": float(scores["area"][k]),
        "background_share": float(scores["background_share"][k]) if alive else None,
        "vehicle_share": float(scores["vehicle_share"][k]) if alive else None,
        "best_part": classes[int(scores["best_part"][k])],
        "best_iou": float(scores["iou"][k, scores["best_part"][k]]),
        "image_dependence": _clean(float(scores["image_dependence"][k])),
        "mass_share": dict(zip(classes, map(float, scores["mass_share"][k]))),
        "iou": dict(zip(classes, map(float, scores["iou"][k]))),
    })
  return {
      "num_images": int(num_images),
      "parts_on_vehicle": scores["parts_on_vehicle"],
      "background_on_background": _clean(scores["background_on_background"]),
      "background_taken": _clean(scores["background_taken"]),
      "image_dependence": scores["image_dependence_mean"],
      "part_iou": scores["part_iou"],
      "distinct_parts": scores["distinct_parts"],
      "prototypes": prototypes,
  }


def attention_scalars(row: dict[str, Any]) -> dict[str, float]:
  """TensorBoard scalars of a row: summaries and each map's main scores."""
  out = {f"attention/{k}": float(row[k]) for k in SUMMARY if row.get(k) is not None}
  for p in row["prototypes"]:
    name = p["name"].replace(" ", "_")
    for k in ("area", "vehicle_share", "best_iou", "image_dependence"):
      if p[k] is not None:
        out[f"attention/{name}/{k}"] = float(p[k])
  return out


def markdown(row: dict[str, Any]) -> str:
  """The row as a small table: one line per map, then the summaries."""

  def pct(v):
    return "-" if v is None else f"{100 * v:.1f}"

  lines = [f"Attention vs ground-truth part masks ({row['num_images']} test images; %)", "",
           "| map | area | on vehicle | on background | best part (IoU) | image dependence |",
           "|---|---|---|---|---|---|"]
  for p in row["prototypes"]:
    lines.append(f"| {p['name']} | {pct(p['area'])} | {pct(p['vehicle_share'])} | "
                 f"{pct(p['background_share'])} | {p['best_part']} ({pct(p['best_iou'])}) | "
                 f"{pct(p['image_dependence'])} |")
  lines += ["", f"Parts' mass on the vehicle {pct(row['parts_on_vehicle'])}; background "
            f"map's mass on background {pct(row['background_on_background'])}, share of "
            f"background pixels it takes {pct(row['background_taken'])}; image dependence "
            f"{pct(row['image_dependence'])}; part IoU {pct(row['part_iou'])}; "
            f"{row['distinct_parts']} distinct best parts."]
  return "\n".join(lines) + "\n"


def summary_table(rows: dict[str, dict[str, Any]]) -> str:
  """Markdown: one line of summaries per named row (e.g. trained vs random weights)."""
  lines = ["| model | parts on vehicle | background map on background | background taken "
           "| image dependence | part IoU | distinct parts |", "|---" * 7 + "|"]
  for name, row in rows.items():
    cells = ["-" if row[k] is None else f"{100 * row[k]:.1f}" for k in SUMMARY[:-1]]
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {row['distinct_parts']} |")
  return "\n".join(lines) + "\n"


def has_part_masks(sources: Sequence[Sequence[dict[str, Any]]]) -> bool:
  """Whether the splits' records carry ground-truth label maps."""
  return all(len(s) and MASK_KEY in s[0] for s in sources)


def score_splits(maps_NxHxWxK: np.ndarray, sources: Sequence[Sequence[dict[str, Any]]],
                 classes: Sequence[str]) -> dict[str, Any]:
  """Scores the maps of every record of the splits, in order (JSON-ready, `to_row`);
  `classes` names the values of the records' label maps."""
  fractions = []
  for source in sources:
    for i in range(len(source)):
      mask = decode_mask(source[i][MASK_KEY], where=f"record {i}")
      fractions.append(class_fractions(mask, maps_NxHxWxK.shape[1:3], len(classes)))
  return to_row(score_maps(maps_NxHxWxK, np.stack(fractions)), len(maps_NxHxWxK), classes)
