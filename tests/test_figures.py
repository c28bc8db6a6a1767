"""The figures: overlay geometry, colours, and the panels beside ground-truth part maps."""

import cv2
import numpy as np
from matplotlib import colormaps

from musp_jax.training import figures


def test_attention_map_is_resized_to_the_image_geometry():
  map_hxw = np.zeros((4, 8), np.float32)
  map_hxw[1, 5] = 1.0  # cell (1, 5) covers rows 10..19, columns 50..59 of a 40 x 80 image
  up = figures.resize_map(map_hxw, (40, 80))
  assert up.shape == (40, 80)
  row, col = np.unravel_index(np.argmax(up), up.shape)
  assert 10 <= row < 20 and 50 <= col < 60
  # Half-pixel-centred bilinear: output pixel 14 (centre 14.5) samples the map at
  # (14.5 / 10) - 0.5 = 0.95 rows, 0.05 from the hot cell's centre in each axis.
  # OpenCV interpolates float32 maps in float32 (a few roundings, ~3e-7; no XLA):
  # rtol=1e-5.
  np.testing.assert_allclose(up[14:16, 54:56], 0.95 * 0.95, rtol=1e-5)
  assert up[:5].max() == 0.0 and up[:, :40].max() == 0.0  # far from the cell: nothing
  # Symmetric about the cell's centre (pixel centres aligned, no half-pixel shift).
  np.testing.assert_allclose(up[10:20, 45:65], up[10:20, 45:65][::-1, ::-1],
                             atol=1e-6)  # the same float32 roundings, mirrored


def test_overlay_blends_the_colour_map_at_the_image_size():
  image = np.full((30, 50, 3), 200, np.uint8)
  map_hxw = np.zeros((3, 5), np.float32)
  map_hxw[0, 0] = 1.0
  out = figures.overlay(image, map_hxw, alpha=0.5)
  assert out.shape == image.shape and out.dtype == np.uint8
  cold = np.asarray(colormaps["jet"](0.0)[:3]) * 255
  hot = np.asarray(colormaps["jet"](1.0)[:3]) * 255
  # uint8 pixels: the blend is rounded to an integer (atol=1 grey level).
  np.testing.assert_allclose(out[-1, -1], np.round(0.5 * 200 + 0.5 * cold), atol=1)
  np.testing.assert_allclose(out[4, 4], np.round(0.5 * 200 + 0.5 * hot), atol=1)


def test_attention_beside_the_ground_truth_part_map():
  from tfds_builders.synthetic_vehicles import render
  ident = render.make_identities(0, 2)
  cam = render.make_cameras(0, 1)[0]
  drawn = [render.render(i, cam, render.image_rng(0, 5, j), height=128, view=v)
           for j, (i, v) in enumerate(zip(ident, (render.FRONT, render.SIDE)))]
  # Map 0 takes the top half of every image, the background map the bottom half.
  attention = np.zeros((2, 4, 4, 2), np.float32)
  attention[:, :2, :, 0] = 1.0
  attention[:, 2:, :, 1] = 1.0
  fig = figures.attention_parts_figure([d.image for d in drawn], [d.mask for d in drawn],
                                       attention, render.PART_CLASSES, ["a", "b"])
  axes = np.asarray(fig.axes).reshape(2, 4)
  for row, d in zip(axes, drawn):
    top, bottom = d.mask[:64], d.mask[64:]
    assert [ax.get_title() for ax in row[:2]] == ["image", "ground truth"]
    assert row[2].get_title() == (f"part 1  50%\n"
                                  f"{100 * np.mean(top != render.BACKGROUND):.0f}% on vehicle")
    assert row[3].get_title() == (f"background 50%\n"
                                  f"{100 * np.mean(bottom == render.BACKGROUND):.0f}% on backgr.")
    # The ground-truth panel shows the label map in the class colours.
    shown = row[1].get_images()[0].get_array()
    expected = figures.part_map_image(d.mask)
    np.testing.assert_array_equal(
        shown, cv2.resize(expected, shown.shape[1::-1], interpolation=cv2.INTER_NEAREST))
  legend = [t.get_text() for t in fig.legends[0].get_texts()]
  assert legend == list(render.PART_CLASSES)
