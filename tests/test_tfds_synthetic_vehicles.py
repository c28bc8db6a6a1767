"""Synthetic vehicles: split structure, views and part masks, determinism, and a task that
is hard for raw pixels."""

import collections
import dataclasses
import io

import numpy as np
from PIL import Image
import pytest

from musp_jax.data import datasets
from tfds_builders.synthetic_vehicles import render
from tfds_builders.synthetic_vehicles import scenes
from tfds_builders.synthetic_vehicles import synthetic_vehicles_dataset_builder as sv

NAME = "synthetic_vehicles"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  datasets.build(NAME, data_dir=data_dir, builder_config="tiny")
  return data_dir, {s: list(datasets.load_split(NAME, s, data_dir=data_dir,
                                                builder_config="tiny"))
                    for s in ("train", "query", "gallery")}


def test_splits_like_veri(tiny):
  _, recs = tiny
  cfg = {c.name: c for c in sv.Builder.BUILDER_CONFIGS}["tiny"]
  assert len(recs["train"]) == cfg.num_train_ids * cfg.images_per_id
  assert len(recs["query"]) + len(recs["gallery"]) == cfg.num_test_ids * cfg.images_per_id
  train_ids = {r["vehicle_id"] for r in recs["train"]}
  query_ids = {r["vehicle_id"] for r in recs["query"]}
  assert len(train_ids) == cfg.num_train_ids and len(query_ids) == cfg.num_test_ids
  assert not train_ids & ({r["vehicle_id"] for r in recs["gallery"]} | query_ids)
  assert sorted({r["label"] for r in recs["train"]}) == list(range(cfg.num_train_ids))
  for q in recs["query"]:  # every query has a true match seen by another camera
    assert any(g["vehicle_id"] == q["vehicle_id"] and g["camera_id"] != q["camera_id"]
               for g in recs["gallery"])
  cams = {r["camera_id"] for s in recs.values() for r in s}
  assert cams <= set(range(1, cfg.num_cameras + 1)) and len(cams) > 2
  lo, hi = cfg.height_range
  sizes = collections.defaultdict(set)
  for r in recs["train"]:
    image = Image.open(io.BytesIO(r["image"]))
    mask = Image.open(io.BytesIO(r["part_mask"]))
    assert mask.mode == "L" and mask.size == image.size  # one label per pixel
    assert np.asarray(mask).max() < len(render.PART_CLASSES)
    sizes[render.VIEWS[r["metadata"]["view"]]].add(image.size)
  assert sizes.keys() == set(render.VIEWS)  # every view occurs
  assert sum(map(len, sizes.values())) > 10  # sizes vary like detector crops
  assert all(lo <= h <= hi for s in sizes.values() for _, h in s)
  # The crop follows the vehicle: side views are wide, front and rear ones are not.
  assert min(w / h for w, h in sizes["side"]) > 1.3
  assert max(w / h for v in ("front", "rear") for w, h in sizes[v]) < 1.35


def test_identity_attributes_are_consistent_and_distinct(tiny):
  _, recs = tiny
  attrs = collections.defaultdict(set)
  for split in recs.values():
    for r in split:
      m = r["metadata"]
      attrs[r["vehicle_id"]].add((m["color"], m["type"], m["parts"]))
  assert all(len(a) == 1 for a in attrs.values())  # one look per identity, in any view
  looks = [next(iter(a)) for a in attrs.values()]
  assert len(set(looks)) == len(looks)  # no two identities identical
  # Identities share body and colour in groups: only parts tell them apart.
  many = render.make_identities(0, 150)
  models = collections.Counter(i.model for i in many)
  assert max(models.values()) >= 3


def _encoded(records):
  return [(r.image, r.extra["part_mask"]) for r in records]


def test_same_seed_same_bytes_in_any_order():
  cfg = {c.name: c for c in sv.Builder.BUILDER_CONFIGS}["tiny"]
  builder = sv.Builder(config=cfg, data_dir="/nonexistent")
  first = _encoded(builder._records(range(1, 4), lambda j, cams: True))
  again = _encoded(builder._records(range(3, 0, -1), lambda j, cams: True))
  per_id = cfg.images_per_id
  assert first == again[2 * per_id:] + again[per_id:2 * per_id] + again[:per_id]
  other = sv.SyntheticConfig(name="tiny_seed1", num_train_ids=16, num_test_ids=12,
                             images_per_id=8, num_cameras=6, seed=1)
  other_images = _encoded(sv.Builder(config=other, data_dir="/nonexistent")
                          ._records(range(1, 4), lambda j, cams: True))
  assert all(a[0] != b[0] and a[1] != b[1] for a, b in zip(first, other_images))


def test_built_bytes_are_reproducible(tiny, tmp_path):
  data_dir, recs = tiny
  datasets.build(NAME, data_dir=str(tmp_path), builder_config="tiny")
  again = datasets.load_split(NAME, "gallery", data_dir=str(tmp_path), builder_config="tiny")
  assert [r["image"] for r in again] == [r["image"] for r in recs["gallery"]]
  assert [r["part_mask"] for r in again] == [r["part_mask"] for r in recs["gallery"]]


# An identity with every part family: a roof rack, a sticker and a stripe.
FULL = render.Identity(body=0, color=4, roof=1, lamp=2, wheel=1, sticker=1 + 4 * 1 + 2,
                       stripe=1, paint=(40.0, 72.0, 165.0))


def _clean(ident, view, index=0):
  cam = render.make_cameras(0, 1)[0]
  return render.render(ident, cam, render.image_rng(0, 99, index), height=150, view=view,
                       nuisance=False)


def _colours(image, where):
  return {tuple(int(v) for v in c) for c in image[where]}


def _allowed_colours(ident):
  """The colours the drawing may give each class, from the renderer's own constants."""
  paint = np.array(ident.paint)
  shades = {render._fill(paint)} | {render._fill(paint * s) for s in render.BODY_SHADES}
  return {
      render.BACKGROUND: {(128, 128, 128), render.SHADOW_RGB},
      render.BODY: shades | {render.PLATE_RGB},
      render.LAMPS: {render.HEAD_LAMP_RGB, render.TAIL_LAMP_RGB, render.LAMP_RIM_RGB},
      render.WHEELS: {render.TYRE_RGB, render.HUB_RGB, render.RIM_RGB, render.SPOKE_RGB},
      render.WINDOWS: {render.WINDOW_RGB, render._fill(paint * render.BODY_SHADES[0])},
      render.ROOF: {render.RACK_RGB, render.BOX_RGB, render.BOX_RIM_RGB,
                    render.LIGHT_BAR_RGB, render.ANTENNA_RGB},
      render.MARKS: set(ident.mark_colors),
  }


@pytest.mark.parametrize("view", render.VIEWS)
def test_every_view_draws_every_part_class(view):
  out = _clean(FULL, render.VIEWS.index(view))
  assert out.view == render.VIEWS.index(view)
  assert out.mask.shape == out.image.shape[:2]
  present = set(np.unique(out.mask).tolist())
  assert present == set(range(len(render.PART_CLASSES))), present
  # Both the sticker and the stripe are drawn (each in its own colour).
  marks = _colours(out.image, out.mask == render.MARKS)
  assert marks == set(FULL.mark_colors) and len(marks) == 2


def test_masks_are_aligned_with_the_drawing():
  idents = render.make_identities(0, 12) + [FULL]
  for i, ident in enumerate(idents):
    allowed = _allowed_colours(ident)
    for view in range(len(render.VIEWS)):
      out = _clean(ident, view, index=i)
      for cls, colours in allowed.items():
        found = _colours(out.image, out.mask == cls)
        assert found <= colours, (ident, render.VIEWS[view], render.PART_CLASSES[cls],
                                  found - colours)
      # Conversely every pixel in a sticker or stripe colour is labelled as one.
      for colour in ident.mark_colors:
        where = np.all(out.image == colour, axis=-1)
        assert where.any() and np.all(out.mask[where] == render.MARKS)


def test_nuisances_keep_the_geometry_and_the_occluder_hides_parts():
  idents = render.make_identities(0, 8)
  cams = render.make_cameras(0, 3)
  occluded = 0
  for vid, ident in enumerate(idents):
    for j in range(6):
      full = render.render(ident, cams[j % 3], render.image_rng(0, vid, j), height=140)
      clean = render.render(ident, cams[j % 3], render.image_rng(0, vid, j), height=140,
                            nuisance=False)
      assert full.view == clean.view and full.image.shape == clean.image.shape
      # Same label map, except where the occluder (labelled background) covers the vehicle.
      differs = full.mask != clean.mask
      assert np.all(full.mask[differs] == render.BACKGROUND)
      occluded += differs.any()
      assert differs.mean() < 0.25
  assert 0 < occluded < 48  # some images are occluded, not all


def _pixels(rec, size=(32, 32)) -> np.ndarray:
  img = Image.open(io.BytesIO(rec["image"])).convert("RGB").resize(size, Image.BILINEAR)
  return np.asarray(img, np.float32).ravel()


def _cmc1(query, gallery, feats_q, feats_g) -> float:
  """CMC@1 with same-id-same-camera gallery items removed (the VeRi protocol)."""
  hits = []
  for q, f in zip(query, feats_q):
    dist = ((feats_g - f) ** 2).sum(axis=1)
    keep = [not (g["vehicle_id"] == q["vehicle_id"] and g["camera_id"] == q["camera_id"])
            for g in gallery]
    order = [i for i in np.argsort(dist, kind="stable") if keep[i]]
    hits.append(gallery[order[0]]["vehicle_id"] == q["vehicle_id"])
  return float(np.mean(hits))


def test_raw_pixels_do_not_solve_it_but_clean_views_do(tiny):
  _, recs = tiny
  q, g = recs["query"], recs["gallery"]
  raw = _cmc1(q, g, np.stack([_pixels(r) for r in q]), np.stack([_pixels(r) for r in g]))
  assert raw < 0.35, raw
  # The identity is in the pixels: clean renders of the same pose tell the identities
  # apart, also those of the same body and colour.
  idents = render.make_identities(0, 28)
  for view in range(len(render.VIEWS)):
    clean = np.stack([np.asarray(Image.fromarray(_clean(i, view).image).resize((48, 48)),
                                 np.float32).ravel() for i in idents])
    d = ((clean[:, None] - clean[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    assert d.min() > 0


def test_identity_codes_round_trip():
  idents = render.make_identities(3, 200)
  codes = [render.identity_code(i) for i in idents]
  assert len(set(codes)) == len(idents)  # make_identities draws distinct codes
  for ident, code in zip(idents, codes):
    assert tuple(render._digits(code)) == ident.attributes  # pylint: disable=protected-access


def test_parts_set_groups_share_body_and_paint_and_differ_only_in_parts():
  spec = scenes.SETS["parts"][1]
  idents = scenes.identities(spec)
  assert len(idents) == spec.num_train_ids + spec.num_test_ids
  assert spec.num_train_ids % spec.group_size == 0  # no group is split by train/test
  groups = [idents[i:i + spec.group_size] for i in range(0, len(idents), spec.group_size)]
  for group in groups:
    assert len({(i.body, i.color, i.paint) for i in group}) == 1  # the whole look shared
    assert len({scenes.part_code(i) for i in group}) == len(group)  # parts all differ
  assert len({(g[0].body, g[0].color) for g in groups}) == len(groups)  # a model each
  # The stored metadata says the same: one colour and type per group of vehicle ids.
  first = list(scenes.scenes(spec, range(1, spec.group_size + 1), lambda j, cams: j == 0))
  assert len({(r.metadata["color"], r.metadata["type"]) for r in first}) == 1
  assert len({r.metadata["parts"] for r in first}) == spec.group_size


def test_pretraining_identities_are_in_no_other_set():
  spec = scenes.SETS["pretrain"][1]
  pretrain = scenes.identities(spec)
  looks = {i.attributes for i in pretrain}
  assert len(looks) == len(pretrain) == spec.num_train_ids + spec.num_test_ids
  for name, (_, other) in scenes.SETS.items():
    if name == "pretrain":
      continue
    others = scenes.identities(other)
    test_ids = others[other.num_train_ids:]  # the query / gallery identities
    assert len(test_ids) == other.num_test_ids
    assert not looks & {i.attributes for i in others}, name  # train and test alike
  # Seen by other cameras too (another seed).
  assert spec.seed != scenes.SETS["parts"][1].seed


def test_builder_configs_are_the_named_sets():
  configs = {c.name: c for c in sv.Builder.BUILDER_CONFIGS}
  assert list(configs) == list(scenes.SETS)
  for name, (_, spec) in scenes.SETS.items():
    assert all(getattr(configs[name], f.name) == getattr(spec, f.name)
               for f in dataclasses.fields(scenes.SetSpec))


def test_loose_parts_set_moves_and_scales_the_same_vehicles():
  tight, loose = scenes.SETS["parts"][1], scenes.SETS["parts_loose"][1]
  assert scenes.identities(loose) == scenes.identities(tight)
  keep = lambda j, cams: j < 4  # noqa: E731
  a = list(scenes.scenes(tight, range(1, 11), keep))
  b = list(scenes.scenes(loose, range(1, 11), keep))
  assert [(r.file_name, r.metadata) for r in a] == [(r.file_name, r.metadata) for r in b]

  def vehicle(r):  # the vehicle's share of the frame and its centre (fractions)
    mask = np.asarray(Image.open(io.BytesIO(r.part_mask))) != render.BACKGROUND
    ys, xs = np.nonzero(mask)
    return mask.mean(), xs.mean() / mask.shape[1], ys.mean() / mask.shape[0]

  va, vb = np.array([vehicle(r) for r in a]), np.array([vehicle(r) for r in b])
  # The area goes with the square of the fill: E[f^2] is 0.75 for U(0.78, 0.95) and
  # 0.48 for U(0.4, 0.95), a ratio of 0.64 (40 images, occluders and poses: +- 0.1).
  assert vb[:, 0].mean() / va[:, 0].mean() == pytest.approx(0.64, abs=0.1)
  # And the vehicle's centre moves over a wider range of the frame.
  assert (vb[:, 1:].std(0) > 1.5 * va[:, 1:].std(0)).all()
