"""Procedural vehicle images with ground-truth part masks, seen from several viewpoints.

An identity is a model (body shape + paint colour, shared by several identities) plus part
details (roof item, lamp shape, wheel style, sticker, stripe), so telling similar
identities apart needs the parts. Each image is a tight, detector-like crop of the
vehicle seen from the front, the rear or the side (facing left or right); the identity's
parts are drawn in every view where they are visible (the stripe wraps round the body,
the sticker sits on the windscreen or bumper seen from the front or rear, on a window or
door seen from the side, the wheel style shows only from the side). With every image
comes a label map of the same size (PART_CLASSES: background, body and each part
family), drawn with the same polygons as the pixels.

Each image draws its view, size, pose, background clutter, occlusion, lighting, blur,
noise and its camera's colour cast from its own generator, seeded by (seed, vehicle id,
image index): the same seed gives the same bytes in any order and in any process.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Callable, NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Paint colours (RGB); several identities share each (body, colour) model.
COLORS = np.array([
    (235, 235, 232), (28, 28, 32), (160, 164, 170), (190, 30, 35), (35, 70, 170),
    (225, 190, 40), (40, 120, 60), (120, 75, 45),
], np.float32)
NUM_BODIES = 5  # sedan, suv, hatchback, van, pickup
NUM_ROOF = 5  # none, rack, box, light bar, antenna
NUM_LAMP = 3  # rectangle, round, slanted
NUM_WHEEL = 3  # solid hub, spokes, light ring
NUM_STICKER = 1 + 4 * 4  # none, or one of 4 places x 4 colours
NUM_STRIPE = 1 + 4  # none, or one of 4 colours
PART_COLORS = np.array([(250, 120, 20), (20, 200, 220), (230, 40, 160), (140, 230, 40)],
                       np.float32)
_RADIX = (NUM_BODIES, len(COLORS), NUM_ROOF, NUM_LAMP, NUM_WHEEL, NUM_STICKER, NUM_STRIPE)

VIEWS = ("front", "rear", "side")
FRONT, REAR, SIDE = range(len(VIEWS))
# Label-map values: index into PART_CLASSES.
PART_CLASSES = ("background", "body", "lamps", "wheels", "windows", "roof item",
                "sticker/stripe")
BACKGROUND, BODY, LAMPS, WHEELS, WINDOWS, ROOF, MARKS = range(len(PART_CLASSES))

# Fixed colours of the drawing (the paint and the part colours come from the identity).
WINDOW_RGB = (40, 55, 70)
HEAD_LAMP_RGB = (255, 250, 200)
TAIL_LAMP_RGB = (200, 20, 20)
LAMP_RIM_RGB = (60, 60, 60)
TYRE_RGB = (15, 15, 15)
HUB_RGB = (70, 70, 75)
RIM_RGB = (210, 210, 215)
SPOKE_RGB = (200, 200, 205)
RACK_RGB = (20, 20, 20)
BOX_RGB = (235, 235, 235)
BOX_RIM_RGB = (90, 90, 90)
LIGHT_BAR_RGB = (250, 60, 40)
ANTENNA_RGB = (10, 10, 10)
PLATE_RGB = (215, 215, 200)
SHADOW_RGB = (25, 25, 25)
# Body details are drawn in the paint darkened by these factors (outline, grille, bumper).
BODY_SHADES = (0.55, 0.35, 0.75)

# Side profiles facing right in units of the car length: x in [0, 1], y up from the road.
# (body polygon, window polygon, wheel centres x, wheel radius, roof (x0, x1, y)).
_BODIES = (
    (((0, .14), (0, .40), (.22, .46), (.30, .72), (.68, .72), (.80, .48), (1, .42),
      (1, .14)),
     ((.32, .49), (.36, .68), (.66, .68), (.76, .49)), (.2, .8), .1, (.36, .66, .72)),
    (((0, .16), (0, .80), (.10, .90), (.76, .90), (.86, .60), (1, .54), (1, .16)),
     ((.12, .58), (.14, .84), (.74, .84), (.82, .58)), (.2, .8), .115, (.14, .74, .90)),
    (((.06, .14), (.06, .66), (.20, .76), (.62, .76), (.78, .50), (.94, .44),
      (.94, .14)),
     ((.16, .50), (.22, .71), (.60, .71), (.72, .50)), (.22, .78), .1, (.22, .6, .76)),
    (((0, .14), (0, .96), (.82, .96), (.96, .62), (1, .58), (1, .14)),
     ((.60, .62), (.62, .90), (.81, .90), (.92, .62)), (.18, .82), .1, (.05, .8, .96)),
    (((0, .16), (0, .48), (.46, .48), (.48, .80), (.74, .80), (.84, .52), (1, .48),
      (1, .16)),
     ((.50, .54), (.52, .75), (.72, .75), (.80, .54)), (.2, .8), .11, (.5, .72, .80)),
)
# Seen from the front or rear, x runs across the car's width in [0, 1], y is the same
# height as in the profile. Per body: how far the roof edge is inset from the sides.
_ROOF_INSET = (.20, .10, .17, .08, .17)
# y units per width unit in front/rear views: a car is about 1.8 m wide and one y
# unit is 0.42 of a 4.5 m length.
_FRONT_Y_SCALE = 1.05
_SIDE_Y_SCALE = 0.42  # y units per length unit in side views
_ROOF_ITEM_HEIGHT = 0.12  # room above the roof kept inside the crop
# Side view: on the side window (front, rear) or on a door (front, rear); x, y.
_STICKER_PLACES = ((.40, .58), (.60, .58), (.32, .24), (.58, .24))
_STICKER_SIZE = (.07, .08)  # side view: length units, y units
_STRIPE_Y = (.26, .31)
_LAMP_Y = .36  # front / rear lamps: centre height
MAX_ASPECT = 2.2  # widest crop (width / height)


@dataclasses.dataclass(frozen=True)
class Identity:
  body: int
  color: int
  roof: int
  lamp: int
  wheel: int
  sticker: int
  stripe: int
  paint: tuple[float, float, float]  # colour with a small per-identity shade

  @property
  def model(self) -> tuple[int, int]:
    return self.body, self.color

  @property
  def attributes(self) -> tuple[int, ...]:
    """(body, colour, roof, lamp, wheel, sticker, stripe): everything but the shade."""
    return (self.body, self.color, self.roof, self.lamp, self.wheel, self.sticker,
            self.stripe)

  @property
  def mark_colors(self) -> tuple[tuple[int, int, int], ...]:
    """The colours of its sticker and stripe (the MARKS class), if it has them."""
    out = []
    if self.sticker:
      out.append(_fill(PART_COLORS[(self.sticker - 1) % 4]))
    if self.stripe:
      out.append(_fill(PART_COLORS[self.stripe - 1]))
    return tuple(out)


def make_identities(seed: int, count: int) -> list[Identity]:
  """`count` distinct identities (no two share every attribute), fixed by `seed`."""
  rng = np.random.default_rng([seed, 7])
  space = int(np.prod(_RADIX))
  if count > space:
    raise ValueError(f"At most {space} synthetic identities, asked for {count}.")
  codes = rng.choice(space, size=count, replace=False)
  ids = []
  for code in codes:
    digits = _digits(int(code))
    ids.append(Identity(*digits, paint=_paint(digits[1], rng)))
  return ids


def _paint(color: int, rng: np.random.Generator) -> tuple[float, float, float]:
  """The colour with a small random shade (one draw of `rng`)."""
  shade = rng.uniform(-12, 12, 3)
  return tuple(float(v) for v in np.clip(COLORS[color] + shade, 0, 255))


def _digits(code: int) -> list[int]:
  """An identity code -> its attributes (body, colour, roof, lamp, wheel, sticker,
  stripe), mixed radix with the body as the lowest digit."""
  digits = []
  for r in _RADIX:
    code, d = divmod(code, r)
    digits.append(d)
  return digits


def identity_code(ident: Identity) -> int:
  """The attributes of an identity as one integer (the inverse of `_digits`); two
  identities with the same code look the same up to their paint's small shade."""
  code = 0
  for digit, radix in zip(reversed(ident.attributes), reversed(_RADIX)):
    code = code * radix + digit
  return code


def make_part_groups(seed: int, count: int, group_size: int) -> list[Identity]:
  """`count` identities in groups of `group_size` consecutive ones that share body
  shape and paint exactly (the shade too) and differ only in their parts.

  Groups take distinct (body, colour) models while there are enough of them; within
  a group no two identities share every part (roof item, lamps, wheels, sticker,
  stripe), so only the parts tell them apart.
  """
  part_space = int(np.prod(_RADIX[2:]))
  if not 1 <= group_size <= part_space:
    raise ValueError(f"group_size={group_size}: expected 1..{part_space}.")
  rng = np.random.default_rng([seed, 19])
  num_groups = -(-count // group_size)
  num_models = NUM_BODIES * len(COLORS)
  models = rng.choice(num_models, size=num_groups, replace=num_groups > num_models)
  ids = []
  for model in models:
    body, color = divmod(int(model), len(COLORS))
    paint = _paint(color, rng)
    for parts in rng.choice(part_space, size=group_size, replace=False):
      digits = _digits(int(parts) * NUM_BODIES * len(COLORS))[2:]
      ids.append(Identity(body, color, *digits, paint=paint))
  return ids[:count]


def make_identities_except(seed: int, count: int, exclude: Sequence[int]) -> list[Identity]:
  """`count` distinct random identities (as make_identities) whose codes
  (`identity_code`) are none of `exclude`."""
  rng = np.random.default_rng([seed, 23])
  pool = np.setdiff1d(np.arange(int(np.prod(_RADIX))), np.asarray(exclude, np.int64))
  if count > len(pool):
    raise ValueError(f"At most {len(pool)} identities outside the excluded ones, asked "
                     f"for {count}.")
  ids = []
  for code in rng.choice(pool, size=count, replace=False):
    digits = _digits(int(code))
    ids.append(Identity(*digits, paint=_paint(digits[1], rng)))
  return ids


@dataclasses.dataclass(frozen=True)
class Camera:
  gains: np.ndarray  # per-channel colour cast
  sky: np.ndarray
  ground: np.ndarray
  horizon: float  # fraction of the height


def make_cameras(seed: int, count: int) -> list[Camera]:
  cams = []
  for c in range(count):
    rng = np.random.default_rng([seed, 11, c])
    cams.append(Camera(
        gains=rng.uniform(0.8, 1.2, 3).astype(np.float32),
        sky=rng.uniform(60, 200, 3).astype(np.float32),
        ground=rng.uniform(50, 140, 3).astype(np.float32),
        horizon=float(rng.uniform(0.3, 0.6))))
  return cams


def _fill(c) -> tuple[int, int, int]:
  return tuple(int(v) for v in np.clip(c, 0, 255))


class Rendered(NamedTuple):
  image: np.ndarray  # (H, W, 3) uint8
  mask: np.ndarray  # (H, W) uint8, values index PART_CLASSES
  view: int  # index into VIEWS


class _Painter:
  """Draws each shape into the picture and, with its class, into the label map."""

  def __init__(self, img: Image.Image, mask: Image.Image,
               to_px: Callable[[Sequence], list[tuple[float, float]]]):
    self._rgb = ImageDraw.Draw(img)
    self._label = ImageDraw.Draw(mask)
    self.to_px = to_px

  def polygon(self, pts, rgb, cls: int, outline=None, *, in_pixels: bool = False) -> None:
    xy = list(pts) if in_pixels else self.to_px(pts)
    self._rgb.polygon(xy, fill=_fill(rgb), outline=None if outline is None else _fill(outline))
    self._label.polygon(xy, fill=cls)
    if outline is not None:  # PIL skips an outline of the fill's own value: draw it apart
      self._label.polygon(xy, outline=cls)

  def line(self, pts, rgb, cls: int, width: int, *, in_pixels: bool = False) -> None:
    xy = list(pts) if in_pixels else self.to_px(pts)
    self._rgb.line(xy, fill=_fill(rgb), width=width)
    self._label.line(xy, fill=cls, width=width)

  def rect(self, x0, y0, x1, y1, rgb, cls: int, outline=None) -> None:
    self.polygon(((x0, y0), (x1, y0), (x1, y1), (x0, y1)), rgb, cls, outline)


def _box(x0, y0, x1, y1) -> list[tuple[float, float]]:
  return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _ellipse(cx, cy, rx, ry, n=16) -> np.ndarray:
  t = np.linspace(0, 2 * np.pi, n, endpoint=False)
  return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _lamp_shape(lamp: int, x0: float, x1: float, yc: float, y_per_x: float
                ) -> np.ndarray:
  """One front/rear lamp of style `lamp` spanning [x0, x1] (outer edge at x0)."""
  half = 0.045
  if lamp == 0:  # rectangle
    return np.array(_box(x0, yc - half, x1, yc + half))
  if lamp == 1:  # round, as tall as the others
    return _ellipse((x0 + x1) / 2, yc, half * y_per_x, half)
  # slanted: high at the outer edge, narrowing inwards
  return np.array([(x0, yc + half), (x1, yc + half * 0.2), (x1, yc - half * 0.6),
                   (x0, yc - half)])


def _draw_side(p: _Painter, ident: Identity, width_px: int) -> None:
  """The profile facing +x (the caller's transform mirrors it for the other side)."""
  body_pts, window_pts, wheel_xs, wheel_r, (rx0, rx1, ry) = _BODIES[ident.body]
  paint = np.array(ident.paint)
  dark = paint * BODY_SHADES[0]
  p.polygon(_box(0.0, 0.0, 1.0, 0.05), SHADOW_RGB, BACKGROUND)
  p.polygon(body_pts, paint, BODY, outline=dark)
  if ident.stripe:
    p.rect(.02, _STRIPE_Y[0], .98, _STRIPE_Y[1], PART_COLORS[ident.stripe - 1], MARKS)
  p.polygon(window_pts, WINDOW_RGB, WINDOWS, outline=dark)
  if ident.sticker:
    place, col = divmod(ident.sticker - 1, 4)
    x, y = _STICKER_PLACES[place]
    if ident.body == 3 and place < 2:  # vans have no side window there: use the body
      y = 0.75
    p.rect(x, y, x + _STICKER_SIZE[0], y + _STICKER_SIZE[1], PART_COLORS[col], MARKS)
  # Head lamp (identity part) at the front, tail lamp at the back.
  lamp_y = 0.40
  if ident.lamp == 0:
    head = _box(.92, lamp_y - .05, 1.0, lamp_y + .03)
  elif ident.lamp == 1:
    head = _ellipse(0.955, lamp_y - 0.01, 0.035, 0.035 / _SIDE_Y_SCALE)
  else:
    head = [(.88, lamp_y + .04), (1.0, lamp_y + .02), (1.0, lamp_y - .06)]
  p.polygon(head, HEAD_LAMP_RGB, LAMPS, outline=LAMP_RIM_RGB)
  p.rect(0, .34, .04, .42, TAIL_LAMP_RGB, LAMPS)
  # Roof item.
  if ident.roof == 1:  # rack: rails with posts
    p.rect(rx0, ry + .06, rx1, ry + .09, RACK_RGB, ROOF)
    for x in (rx0 + .03, rx1 - .05):
      p.rect(x, ry, x + .02, ry + .07, RACK_RGB, ROOF)
  elif ident.roof == 2:  # cargo box
    p.polygon([(rx0 + .05, ry), (rx1 - .05, ry), (rx1 - .08, ry + .12),
               (rx0 + .08, ry + .12)], BOX_RGB, ROOF, outline=BOX_RIM_RGB)
  elif ident.roof == 3:  # light bar
    mid = (rx0 + rx1) / 2
    p.rect(mid - .08, ry, mid + .08, ry + .06, LIGHT_BAR_RGB, ROOF)
  elif ident.roof == 4:  # antenna
    p.line([(rx0 + .04, ry), (rx0 - .04, ry + .25)], ANTENNA_RGB, ROOF,
           width=max(1, int(width_px / 80)))
  # Wheels: tyre, then the style.
  r = wheel_r * 0.75
  for wx in wheel_xs:
    ry_ = r / _SIDE_Y_SCALE  # round in pixels: y units are _SIDE_Y_SCALE lengths
    cy = ry_  # standing on the road
    p.polygon(_ellipse(wx, cy, r, ry_), TYRE_RGB, WHEELS)
    if ident.wheel == 0:
      p.polygon(_ellipse(wx, cy, r * 0.45, ry_ * 0.45), HUB_RGB, WHEELS)
    elif ident.wheel == 1:
      rim = p.to_px(_ellipse(wx, cy, r * 0.7, ry_ * 0.7, n=5))
      centre = p.to_px([(wx, cy)])[0]
      for pt in rim:
        p.line([centre, pt], SPOKE_RGB, WHEELS, width=max(1, int(width_px / 70)),
               in_pixels=True)
    else:
      p.polygon(_ellipse(wx, cy, r * 0.7, ry_ * 0.7), RIM_RGB, WHEELS)
      p.polygon(_ellipse(wx, cy, r * 0.45, ry_ * 0.45), TYRE_RGB, WHEELS)


def _draw_end(p: _Painter, ident: Identity, view: int, width_px: int) -> None:
  """The front or the rear: x across the width in [0, 1] as the camera sees it."""
  _, window_pts, _, _, (_, _, roof_y) = _BODIES[ident.body]
  belt = min(y for _, y in window_pts)
  inset = _ROOF_INSET[ident.body]
  paint = np.array(ident.paint)
  dark, darker, bumper = (paint * s for s in BODY_SHADES)
  # The rear is the front mirrored: a part on the car's left is on the image's right.
  mirror = view == REAR

  def mx(x0: float, x1: float) -> tuple[float, float]:
    return (1 - x1, 1 - x0) if mirror else (x0, x1)

  p.polygon(_box(-0.02, 0.0, 1.02, 0.05), SHADOW_RGB, BACKGROUND)
  for x0 in (.06, .80):  # tyres, under the body
    p.rect(x0, 0.0, x0 + .14, .18, TYRE_RGB, WHEELS)
  p.polygon([(0, .15), (1, .15), (1, belt - .04), (.96, belt), (.04, belt), (0, belt - .04)],
            paint, BODY, outline=dark)
  p.polygon([(.06, belt), (.94, belt), (1 - inset, roof_y), (inset, roof_y)], paint, BODY,
            outline=dark)
  p.rect(.02, .15, .98, .21, bumper, BODY)
  if ident.stripe:  # wraps round the body at the height it has on the sides
    p.rect(.02, _STRIPE_Y[0], .98, _STRIPE_Y[1], PART_COLORS[ident.stripe - 1], MARKS)
  if view == FRONT:
    p.rect(.34, .30, .66, .41, darker, BODY)  # grille
  else:
    p.rect(.40, .22, .60, .30, PLATE_RGB, BODY)  # number plate (blank)
  # Windscreen (front) or rear window, inside the cabin.
  top = roof_y - .04
  frac = (top - belt) / max(roof_y - belt, 1e-6)
  side_in = .11 + (inset - .06) * frac
  p.polygon([(.11, belt + .03), (.89, belt + .03), (1 - side_in, top), (side_in, top)],
            WINDOW_RGB, WINDOWS, outline=dark)
  lamp_rgb = HEAD_LAMP_RGB if view == FRONT else TAIL_LAMP_RGB
  for x0, x1 in ((.05, .27), (.95, .73)):  # outer edge first, so the pair is symmetric
    p.polygon(_lamp_shape(ident.lamp, x0, x1, _LAMP_Y, _FRONT_Y_SCALE), lamp_rgb, LAMPS,
              outline=LAMP_RIM_RGB)
  if ident.sticker:
    place, col = divmod(ident.sticker - 1, 4)
    w, h = .10, .08
    # On the windscreen's upper corners, or on the bumper's ends.
    x, y = ((.24, top - .13), (.66, top - .13), (.07, .22), (.83, .22))[place]
    x0, x1 = mx(x, x + w)
    p.rect(x0, y, x1, y + h, PART_COLORS[col], MARKS)
  if ident.roof == 1:  # rack: the two rails end-on and a cross bar
    for x in (inset + .04, 1 - inset - .10):
      p.rect(x, roof_y, x + .06, roof_y + .07, RACK_RGB, ROOF)
    p.rect(inset, roof_y + .06, 1 - inset, roof_y + .09, RACK_RGB, ROOF)
  elif ident.roof == 2:  # cargo box
    p.rect(inset + .05, roof_y, 1 - inset - .05, roof_y + .12, BOX_RGB, ROOF,
           outline=BOX_RIM_RGB)
  elif ident.roof == 3:  # light bar
    p.rect(.30, roof_y, .70, roof_y + .06, LIGHT_BAR_RGB, ROOF)
  elif ident.roof == 4:  # antenna near one side
    x0, x1 = mx(inset + .04, inset + .08)
    base, tip = (x0, x1) if not mirror else (x1, x0)
    p.line([(base, roof_y), (tip, roof_y + .25)], ANTENNA_RGB, ROOF,
           width=max(1, int(width_px / 80)))


def _clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, w: int, h: int,
             paint: bool) -> None:
  """Boxes and blobs behind the vehicle, some in car colours, so colour alone misleads."""
  for _ in range(rng.integers(2, 7)):
    x0, y0 = rng.uniform(-0.1, 1.0) * w, rng.uniform(-0.1, 1.0) * h
    bw, bh = rng.uniform(0.05, 0.35) * w, rng.uniform(0.05, 0.35) * h
    col = COLORS[rng.integers(len(COLORS))] if rng.random() < 0.4 else rng.uniform(0, 255, 3)
    ellipse = rng.random() < 0.5
    if paint:
      shape = draw.ellipse if ellipse else draw.rectangle
      shape((x0, y0, x0 + bw, y0 + bh), fill=_fill(col))


# Share of the limiting crop side the vehicle spans, drawn uniformly in this range:
# tight, detector-like crops (every named set but parts_loose, scenes.SETS).
TIGHT_FILL = (0.78, 0.95)


def render(ident: Identity, camera: Camera, rng: np.random.Generator, *,
           height: int = 144, view: int | None = None, nuisance: bool = True,
           fill_range: tuple[float, float] = TIGHT_FILL) -> Rendered:
  """Renders one image and its label map.

  The crop's width follows the view (side views are wider). `view` None draws it.
  `fill_range`: the share of the limiting crop side the vehicle spans is drawn in it
  (the vehicle is placed anywhere in the margin left); a wider range than TIGHT_FILL
  draws the same random numbers, so only the vehicle's size and place change.
  `nuisance=False` leaves out clutter, occluder, blur, lighting, noise and colour cast
  but draws every random number the same, so the geometry and the label map are those
  of the image with nuisances (except where the occluder covers the vehicle).
  """
  drawn_view = int(rng.integers(len(VIEWS)))
  view = drawn_view if view is None else int(view)
  facing = 1.0 if rng.random() < 0.5 else -1.0  # side views: right or left
  _, _, _, _, (_, _, roof_y) = _BODIES[ident.body]
  top = roof_y + _ROOF_ITEM_HEIGHT
  if view == SIDE:
    yaw = rng.uniform(0.75, 1.0)  # foreshortening of a slightly oblique view
    y_scale = _SIDE_Y_SCALE / yaw
  else:
    yaw = rng.uniform(0.85, 1.0)
    y_scale = _FRONT_Y_SCALE / yaw
  # The vehicle's box is 1 x (top * y_scale) in units of its drawn width.
  # Crop width / height; very long side views get a looser crop, as detectors give.
  aspect = min(MAX_ASPECT, 1.0 / (top * y_scale) * rng.uniform(0.85, 1.15))
  h = int(height)
  w = max(8, int(round(h * aspect)))
  fill = rng.uniform(*fill_range)  # share of the limiting crop side the vehicle spans
  veh_w = min(fill * w, fill * h / (top * y_scale))
  veh_h = veh_w * top * y_scale
  # Place the box anywhere in the remaining margin.
  left = rng.uniform(0, w - veh_w)
  bottom = h - rng.uniform(0, h - veh_h)
  angle = np.deg2rad(rng.uniform(-4, 4))
  shear = rng.uniform(-0.1, 0.1) if view == SIDE else 0.0
  rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  m_2x2 = rot @ np.array([[1.0, shear], [0.0, 1.0]])
  centre = np.array([left + veh_w / 2, bottom - veh_h / 2])
  sx = veh_w * (facing if view == SIDE else 1.0)
  sy = veh_w * y_scale

  def to_px(pts) -> list[tuple[float, float]]:
    """Vehicle coordinates (x in [0, 1], y up from the road) -> pixel coordinates."""
    pts = np.asarray(pts, np.float64).reshape(-1, 2)
    local = np.stack([(pts[:, 0] - 0.5) * sx, -(pts[:, 1] - top / 2) * sy], axis=1)
    return [tuple(q) for q in (local @ m_2x2.T + centre)]

  img = Image.new("RGB", (w, h), _fill(camera.sky) if nuisance else (128, 128, 128))
  mask = Image.new("L", (w, h), BACKGROUND)
  scene = ImageDraw.Draw(img)
  if nuisance:
    scene.rectangle((0, int(camera.horizon * h), w, h), fill=_fill(camera.ground))
  _clutter(scene, rng, w, h, paint=nuisance)
  painter = _Painter(img, mask, to_px)
  if view == SIDE:
    _draw_side(painter, ident, w)
  else:
    _draw_end(painter, ident, view, w)

  # Nuisances: their random numbers are drawn whether or not they are applied.
  occlude = rng.random() < 0.35  # a pole, a sign or another car's edge
  ow = rng.uniform(0.06, 0.2) * w
  ox = rng.uniform(0, w - ow)
  oy = rng.uniform(0.0, 0.5) * h
  occluder_rgb = rng.uniform(0, 255, 3)
  blur = float(rng.uniform(0.3, 1.1))
  theta = rng.uniform(0, 2 * np.pi)
  strength = rng.uniform(0.0, 0.5)
  brightness = rng.uniform(0.65, 1.3)
  noise_sigma = np.float32(rng.uniform(1.0, 6.0))
  if not nuisance:
    return Rendered(np.asarray(img), np.asarray(mask), view)
  if occlude:
    scene.rectangle((ox, oy, ox + ow, h), fill=_fill(occluder_rgb))
    ImageDraw.Draw(mask).rectangle((ox, oy, ox + ow, h), fill=BACKGROUND)
  img = img.filter(ImageFilter.GaussianBlur(radius=blur))
  x_HxWx3 = np.array(img, np.float32)
  # Lighting: global brightness and a soft ramp in a random direction.
  ramp_H = np.sin(theta) * (np.arange(h, dtype=np.float32) / h - 0.5)
  ramp_W = np.cos(theta) * (np.arange(w, dtype=np.float32) / w - 0.5)
  light_HxW = brightness * (1.0 + strength * (ramp_H[:, None] + ramp_W[None, :]))
  x_HxWx3 *= light_HxW[..., None]
  x_HxWx3 *= camera.gains
  noise = rng.standard_normal(x_HxWx3.shape, dtype=np.float32)
  x_HxWx3 += noise * noise_sigma
  return Rendered(np.clip(x_HxWx3, 0, 255).astype(np.uint8), np.asarray(mask), view)


def encode_jpeg(x_HxWx3: np.ndarray, quality: int = 90) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(x_HxWx3).save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


def encode_mask(mask_HxW: np.ndarray) -> bytes:
  """The label map as a single-channel 8-bit PNG (lossless, a few hundred bytes)."""
  buf = io.BytesIO()
  Image.fromarray(np.asarray(mask_HxW, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def image_rng(seed: int, vehicle_id: int, index: int) -> np.random.Generator:
  """The generator of one image: a pure function of its coordinates, not of global state."""
  return np.random.default_rng([seed, 13, vehicle_id, index])
