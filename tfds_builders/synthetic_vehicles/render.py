"""Procedural vehicle images: identities that differ in small parts, seen by many cameras.

An identity is a model (body shape + paint colour, shared by several identities) plus part
details (roof item, lamp shape, wheel style, sticker, stripe), so telling similar
identities apart needs the parts. Each image draws a pose, scale, lighting, background
clutter, occlusion, blur, noise and its camera's colour cast from its own generator,
seeded by (seed, vehicle id, image index): the same seed gives the same bytes in any
order and in any process.
"""

from __future__ import annotations

import dataclasses
import io

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
_STICKER_PLACES = ((.40, .58), (.60, .58), (.15, .30), (.55, .30))  # x, y on the body


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


def make_identities(seed: int, count: int) -> list[Identity]:
  """`count` distinct identities (no two share every attribute), fixed by `seed`."""
  rng = np.random.default_rng([seed, 7])
  space = int(np.prod(_RADIX))
  if count > space:
    raise ValueError(f"At most {space} synthetic identities, asked for {count}.")
  codes = rng.choice(space, size=count, replace=False)
  ids = []
  for code in codes:
    digits = []
    for r in _RADIX:
      code, d = divmod(int(code), r)
      digits.append(d)
    shade = rng.uniform(-12, 12, 3)
    paint = tuple(float(v) for v in np.clip(COLORS[digits[1]] + shade, 0, 255))
    ids.append(Identity(*digits, paint=paint))
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


def render(ident: Identity, camera: Camera, rng: np.random.Generator, *,
           size: tuple[int, int] = (160, 144), nuisance: bool = True) -> np.ndarray:
  """Renders one (H, W, 3) uint8 image; `nuisance=False` gives a canonical clean view."""
  h, w = size
  img = Image.new("RGB", (w, h), _fill(camera.sky))
  draw = ImageDraw.Draw(img)
  hz = int(camera.horizon * h)
  draw.rectangle((0, hz, w, h), fill=_fill(camera.ground))

  if nuisance:
    # Clutter: boxes and blobs, some in car colours, so colour alone misleads.
    for _ in range(rng.integers(3, 9)):
      x0, y0 = rng.uniform(-0.1, 1.0) * w, rng.uniform(-0.1, 1.0) * h
      bw, bh = rng.uniform(0.05, 0.35) * w, rng.uniform(0.05, 0.35) * h
      col = COLORS[rng.integers(len(COLORS))] if rng.random() < 0.4 else rng.uniform(0, 255, 3)
      shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
      shape((x0, y0, x0 + bw, y0 + bh), fill=_fill(col))
    facing = 1.0 if rng.random() < 0.5 else -1.0
    yaw = rng.uniform(0.65, 1.0)  # foreshortening of an oblique view
    length = rng.uniform(0.6, 0.9) * w
    angle = np.deg2rad(rng.uniform(-8, 8))
    shear = rng.uniform(-0.15, 0.15)
    centre = np.array([w * (0.5 + rng.uniform(-0.08, 0.08)),
                       h * (0.55 + rng.uniform(-0.08, 0.08))])
  else:
    facing, yaw, length, angle, shear = 1.0, 1.0, 0.8 * w, 0.0, 0.0
    centre = np.array([w * 0.5, h * 0.55])
  rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  m_2x2 = rot @ np.array([[1.0, shear], [0.0, 1.0]])
  sx, sy = length * facing * yaw, length * 0.42

  def px(pts) -> list[tuple[float, float]]:
    """Car coordinates (x along, y up) -> pixel coordinates."""
    pts = np.asarray(pts, np.float64).reshape(-1, 2)
    local = np.stack([(pts[:, 0] - 0.5) * sx, -(pts[:, 1] - 0.5) * sy], axis=1)
    return [tuple(p) for p in (local @ m_2x2.T + centre)]

  def circle(cx, cy, r, n=16):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    # r is in car-length units; y units are 0.42 of them, so scale y by 1/0.42.
    return px(np.stack([cx + r * np.cos(t), cy + r * np.sin(t) / 0.42], axis=1))

  body_pts, window_pts, wheel_xs, wheel_r, (rx0, rx1, ry) = _BODIES[ident.body]
  paint = np.array(ident.paint)
  dark = _fill(paint * 0.55)
  draw.polygon(px([(0.0, 0.05), (1.0, 0.05), (1.0, 0.0), (0.0, 0.0)]), fill=(25, 25, 25))
  draw.polygon(px(body_pts), fill=_fill(paint), outline=dark)
  if ident.stripe:
    col = _fill(PART_COLORS[ident.stripe - 1])
    draw.polygon(px([(.02, .26), (.98, .26), (.98, .31), (.02, .31)]), fill=col)
  draw.polygon(px(window_pts), fill=(40, 55, 70), outline=dark)
  if ident.sticker:
    place, col = divmod(ident.sticker - 1, 4)
    x, y = _STICKER_PLACES[place]
    if ident.body == 3 and place < 2:  # vans have no side window there: use the body
      y = 0.75
    draw.polygon(px([(x, y), (x + .07, y), (x + .07, y + .08), (x, y + .08)]),
                 fill=_fill(PART_COLORS[col]))
  # Head lamp (identity part) at the front, tail lamp at the back.
  lamp_y = 0.40
  if ident.lamp == 0:
    head = [(.92, lamp_y - .05), (1.0, lamp_y - .05), (1.0, lamp_y + .03), (.92, lamp_y + .03)]
  elif ident.lamp == 1:
    head = circle(0.955, lamp_y - 0.01, 0.035)
  else:
    head = [(.88, lamp_y + .04), (1.0, lamp_y + .02), (1.0, lamp_y - .06)]
  draw.polygon(head if ident.lamp == 1 else px(head), fill=(255, 250, 200), outline=(60, 60, 60))
  draw.polygon(px([(0, .34), (.04, .34), (.04, .42), (0, .42)]), fill=(200, 20, 20))
  # Roof item.
  if ident.roof == 1:  # rack: rails with posts
    draw.polygon(px([(rx0, ry + .06), (rx1, ry + .06), (rx1, ry + .09), (rx0, ry + .09)]),
                 fill=(20, 20, 20))
    for x in (rx0 + .03, rx1 - .05):
      draw.polygon(px([(x, ry), (x + .02, ry), (x + .02, ry + .07), (x, ry + .07)]),
                   fill=(20, 20, 20))
  elif ident.roof == 2:  # cargo box
    draw.polygon(px([(rx0 + .05, ry), (rx1 - .05, ry), (rx1 - .08, ry + .12),
                     (rx0 + .08, ry + .12)]), fill=(235, 235, 235), outline=(90, 90, 90))
  elif ident.roof == 3:  # light bar
    mid = (rx0 + rx1) / 2
    draw.polygon(px([(mid - .08, ry), (mid + .08, ry), (mid + .08, ry + .06),
                     (mid - .08, ry + .06)]), fill=(250, 60, 40))
  elif ident.roof == 4:  # antenna
    draw.line(px([(rx0 + .04, ry), (rx0 - .04, ry + .25)]), fill=(10, 10, 10),
              width=max(1, int(w / 80)))
  # Wheels: tyre, then the style.
  for wx in wheel_xs:
    cy = wheel_r * 0.42 + 0.01
    draw.polygon(circle(wx, cy, wheel_r), fill=(15, 15, 15))
    if ident.wheel == 0:
      draw.polygon(circle(wx, cy, wheel_r * 0.45), fill=(70, 70, 75))
    elif ident.wheel == 1:
      rim = circle(wx, cy, wheel_r * 0.7, n=5)
      centre_px = px([(wx, cy)])[0]
      for p in rim:
        draw.line([centre_px, p], fill=(200, 200, 205), width=max(1, int(w / 70)))
    else:
      draw.polygon(circle(wx, cy, wheel_r * 0.7), fill=(210, 210, 215))
      draw.polygon(circle(wx, cy, wheel_r * 0.45), fill=(15, 15, 15))

  if not nuisance:
    return np.asarray(img)

  if rng.random() < 0.35:  # an occluder (pole, sign or another car's edge)
    ow = rng.uniform(0.06, 0.22) * w
    ox = rng.uniform(0, w - ow)
    oy = rng.uniform(0.0, 0.5) * h
    draw.rectangle((ox, oy, ox + ow, h), fill=_fill(rng.uniform(0, 255, 3)))
  img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.3))))
  x_HxWx3 = np.array(img, np.float32)
  # Lighting: global brightness and a soft ramp in a random direction.
  theta = rng.uniform(0, 2 * np.pi)
  ramp_H = np.sin(theta) * (np.arange(h, dtype=np.float32) / h - 0.5)
  ramp_W = np.cos(theta) * (np.arange(w, dtype=np.float32) / w - 0.5)
  strength = rng.uniform(0.0, 0.5)
  light_HxW = rng.uniform(0.65, 1.3) * (1.0 + strength * (ramp_H[:, None] + ramp_W[None, :]))
  x_HxWx3 *= light_HxW[..., None]
  x_HxWx3 *= camera.gains
  noise = rng.standard_normal(x_HxWx3.shape, dtype=np.float32)
  x_HxWx3 += noise * np.float32(rng.uniform(1.0, 6.0))
  return np.clip(x_HxWx3, 0, 255).astype(np.uint8)


def encode_jpeg(x_HxWx3: np.ndarray, quality: int = 90) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(x_HxWx3).save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


def image_rng(seed: int, vehicle_id: int, index: int) -> np.random.Generator:
  """The generator of one image: a pure function of its coordinates, not of global state."""
  return np.random.default_rng([seed, 13, vehicle_id, index])
