"""An approximate nearest-neighbour index over saved gallery features, re-ranked exactly.

    python -m musp_jax.search index --gallery day1.npz day2.npz --out city.index
    python -m musp_jax.search --index city.index --query photo.jpg --topk 10

For galleries too large to rank by brute force in memory (millions of images).
Candidates come from a faiss IVF index (k-means inverted lists, inner-product
metric); the CAM-weighted squared distance (docs/design.md section 4, `cam_squared`) is
then computed exactly on the candidates' full features, read from a
memory-mapped store on disk, with ranking.pairwise_distance. Results carry
exact distances and are ordered by (distance, gallery index), as brute force
orders them.

Codes kept in memory per image (`Spec.codec`): `flat` (4 bytes a dimension,
exact scores; the default below 65,536 images, where search is then exact),
`sq8` (1 byte a dimension; the default above) or `pq` (1 byte per
`pq_dims` dimensions). IVF rather
than HNSW: training on a sample and adding shard by shard streams, the build
is a few matrix products, and memory is the codes alone, while HNSW keeps a
graph over full vectors and builds slowly on a CPU. SQ8 rather than PQ by
default: on 30,000 images like scripts/bench_search.py's, the 10th and 11th
nearest differ by r * 0.002 in score (median) while PQ codes of 5 to 11
dimensions a byte perturbed scores by 0.02 (std), SQ8 codes by 0.0007, and with
every list scanned, re-ranking 400 candidates gave recall@10 0.987 with PQ (5
dimensions a byte), 20 gave 1.0 with SQ8.

What the index searches
-----------------------
For a query q and a gallery item g with per-branch features f^p (P branches of
C channels), areas a^p, r = sum_p a_q^p a_g^p and n^p = |f^p|^2,

  D(q, g) = sum_p a_q^p a_g^p ||f_q^p - f_g^p||^2 / r.

Expanding the square, for any threshold t,

  r (t - D) = sum_p a_q^p a_g^p (t - n_q^p - n_g^p + 2 f_q^p . f_g^p)
            = u_q(t) . z_g,   with
  z_g    = [a_g^1 f_g^1, ..., a_g^P f_g^P,  s a_g,  s a_g n_g]           (P*C + 2P)
  u_q(t) = [2 a_q^1 f_q^1, ..., 2 a_q^P f_q^P,  a_q (t - n_q) / s,  -a_q / s]

for any s > 0. s = 1/16 (AREA_SCALE): k-means and the assignment of items to
inverted lists see z alone, and at s = 1 the area block would group items by
their areas instead of by the feature block that decides which lists a query
probes (recall@10 stalled at 0.945 however many lists were scanned).

The index stores z_g and returns the items of largest u_q(t) . z_g. Areas are
positive (the global branch has a fixed pseudo-area), so r > 0 and the score's
sign is the sign of t - D: items closer than t score above zero, the others
below. For L2-normalised features (n = 1) and t = 2 the score is
2 (a_q f_q) . (a_g f_g), the inner product of the area-scaled concatenated
features. The score is not monotone in D (it is scaled by r, which differs
from item to item), so a query is answered in two passes over the same
nprobe lists (those whose centroids score best under u_q(2)):

  1. t = 2: K candidates, their exact D; d = the k-th smallest of them.
  2. t = d: K candidates, their exact D; the top k of both passes by (D, index).

Why this is exact when the index is exhaustive (`flat` codes, so scores are
exact inner products, and nprobe = nlist, so every item is scored): let m be
the K-th score of pass 2. Every item g not returned has r_g (d - D_g) <= m, so
if m < 0 then D_g > d. Pass 1 found k items within d, so the exact k-th
distance is <= d, and every item of the exact top k, and every item tied with
the k-th, was returned by pass 2; the exact re-ranking then orders them as
brute force does. If m >= 0 (more than K items within d) pass 2 is repeated
with 2K candidates until m < 0 or all items are returned. (m < 0 is checked
with a margin of float32 rounding.) With SQ8 or PQ codes, or nprobe < nlist,
scores are approximate and some items are not scored: the result is the exact
top k of the candidates found, with exact distances.

On disk (`<out>/`, one folder):
  meta.json        format, model signature and source, feature layout (P, C),
                   faiss version and index parameters, per-file sizes and SHA-256
  ann.faiss        the faiss index of z (in memory at query time)
  feats.npy        (N, P, C) features, float32 (default, the distances then equal
                   brute force's) or float16 (half the disk and page cache; the
                   distances are exact for the float16-rounded features), memory-
                   mapped at query time: only candidates' rows are read
  areas.npy        (N, P) float32;  vehicle_id.npy, camera_id.npy (N,) int64
  file_name.npy    (N,) str, memory-mapped

Building streams over the shards (one shard in memory at a time), writes into a
hidden temporary folder next to `out` and renames it to `out` only when every
file and meta.json are written and synced, so an interrupted build leaves no
folder that looks like an index. Opening checks meta.json, every file's size and
every file's SHA-256 except the feature stores' (too large to hash per query;
`verify_features=True` hashes them too), before faiss reads anything.

Growing (`append`): a day's shards are added without training again. Their
features and labels go into a new segment folder (`seg-0001/`, with the same
five .npy files), their codes into a copy of the faiss index with the new
vectors added (`ann-0001.faiss`, the trained quantizer and codebooks
unchanged), and a new meta.json that lists every segment and every file's size
and SHA-256 replaces the old one by an atomic rename, the commit point. Files
the old meta.json names are never modified, so an append killed at any moment
leaves the previous index as it was (it opens and verifies); the next append
removes what a killed one left. An appended index equals one built from all
its shards with the same trained quantizer (`build_index(..., quantizer_from=)`,
tested); the quantizer only knows the data it was trained on, so recall can
drift as the gallery grows away from it (scripts/bench_search.py measures it):
rebuild from all shards now and then.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import pathlib
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from musp_jax.core import features
from musp_jax.runtime import writing
from musp_jax.retrieval import ranking
from musp_jax.retrieval import saved_features

try:
  import faiss
except ImportError as e:  # the optional `index` extra
  raise ImportError("musp_jax.retrieval.gallery_index needs faiss: pip install 'musp-jax[index]' "
                    "(faiss-cpu).") from e

FORMAT = "musp_jax.index/2"  # /2: segments (appends); /1 (one segment) is read too
FORMATS = ("musp_jax.index/1", FORMAT)
META = "meta.json"
ANN = "ann.faiss"
FEATS = "feats.npy"
# (file, meta key of its array) for the per-item arrays besides the features.
ARRAYS = (("areas.npy", "areas"), ("vehicle_id.npy", "vehicle_id"),
          ("camera_id.npy", "camera_id"), ("file_name.npy", "file_name"))
FILES = (ANN, FEATS) + tuple(name for name, _ in ARRAYS)
CODECS = ("auto", "flat", "sq8", "pq")
STORE_DTYPES = ("float32", "float16")
# Galleries from this size get SQ8 codes by default; below it flat codes (exact
# scores, 4 bytes a dimension) cost little memory and make search exact.
APPROX_FROM = 65_536
ADD_CHUNK = 65_536  # vectors per faiss add (bounded memory)
# The area block of z is scaled by this and u's by its inverse (exact: a power of
# two), so that k-means and the assignment of items to lists, which see z alone,
# group items by their features, the block that decides which lists a query probes.
AREA_SCALE = 1.0 / 16


class IndexFileError(ValueError):
  """An index folder is missing, unfinished, truncated or corrupt."""


# --------------------------------------------------------------------------
# The vectors the ANN indexes and searches (see the module docstring).


def gallery_vectors(feats_NxPxC: np.ndarray, areas_NxP: np.ndarray) -> np.ndarray:
  """z = [a f (P*C), s a (P), s a |f|^2 (P)], float32 (N, P*C + 2P); s = AREA_SCALE."""
  feats = np.asarray(feats_NxPxC, np.float32)
  areas = np.asarray(areas_NxP, np.float32)
  n = len(feats)
  sq_NxP = np.einsum("npc,npc->np", feats, feats)
  return np.concatenate([(feats * areas[..., None]).reshape(n, -1), AREA_SCALE * areas,
                         AREA_SCALE * areas * sq_NxP], axis=1)


def query_vectors(feats_NxPxC: np.ndarray, areas_NxP: np.ndarray,
                  threshold: float | np.ndarray) -> np.ndarray:
  """u(t) = [2 a f, a (t - |f|^2) / s, -a / s]: u(t) . z_g = r (t - D(q, g))."""
  feats = np.asarray(feats_NxPxC, np.float32)
  areas = np.asarray(areas_NxP, np.float32)
  n = len(feats)
  t = np.broadcast_to(np.asarray(threshold, np.float32).reshape(-1, 1), (n, 1))
  sq_NxP = np.einsum("npc,npc->np", feats, feats)
  return np.concatenate([2.0 * (feats * areas[..., None]).reshape(n, -1),
                         areas * (t - sq_NxP) / AREA_SCALE, -areas / AREA_SCALE], axis=1)


def _place(v: np.ndarray, params: dict[str, Any]) -> np.ndarray:
  """z or u with zero columns after the feature block and after the area block.

  Each block fills whole PQ sub-vectors (else one sub-quantizer would mix the
  small, scaled area entries with features) or whole 16-float SIMD words.
  """
  n, offset = len(v), params["area_offset"]
  features = v.shape[1] - 2 * params["parts"]
  out = np.zeros((n, params["dim"]), np.float32)
  out[:, :features] = v[:, :features]
  out[:, offset:offset + v.shape[1] - features] = v[:, features:]
  return out


# --------------------------------------------------------------------------
# Exact re-ranking: retrieval's CAM distance, one query against its candidates.


@jax.jit
def _candidate_distance(q_feats_BxPxC, q_areas_BxP, c_feats_BxKxPxC, c_areas_BxKxP):
  """(B, K) cam_squared distances of each query to its own K candidates."""
  def one(qf, qa, cf, ca):
    return ranking.pairwise_distance(qf[None], qa[None], cf, ca,
                                       distance="cam_squared")[0]
  return jax.vmap(one)(q_feats_BxPxC, q_areas_BxP, c_feats_BxKxPxC, c_areas_BxKxP)


def _bucket(n: int) -> int:
  """Next power of two: few distinct shapes, so few compilations."""
  return 1 << max(0, int(n - 1).bit_length())


# --------------------------------------------------------------------------
# Reading shards.


@dataclasses.dataclass(frozen=True)
class _Shard:
  path: str
  count: int


@dataclasses.dataclass(frozen=True)
class _Layout:
  shards: tuple[_Shard, ...]
  parts: int
  channels: int
  signature: str
  source: str
  name_width: int

  @property
  def num_items(self) -> int:
    return sum(s.count for s in self.shards)


def _npy_header(data: Any, path: str, key: str) -> tuple[tuple[int, ...], np.dtype]:
  """Shape and dtype of one array of an .npz, without reading the array."""
  with data.zip.open(f"{key}.npy") as f:
    version = np.lib.format.read_magic(f)
    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
            else np.lib.format.read_array_header_2_0)
    try:
      shape, _, dtype = read(f)
    except ValueError as e:
      raise ValueError(f"{path}: unreadable header of {key!r}: {e}") from e
  return shape, dtype


def _scan(shards: Sequence[str], expected: tuple[str, tuple[int, int], str] | None = None
          ) -> _Layout:
  """Counts, layout and model of every shard, reading only the small arrays.

  expected: (where, (P, C), model signature) the shards must match (an index).
  """
  if not shards:
    raise ValueError("No gallery shards given.")
  found, first, name_width = [], None, 1
  if expected is not None:
    first = (expected[0], expected[1], expected[2], "")
  for path in shards:
    if not os.path.isfile(path):
      raise FileNotFoundError(f"Gallery shard {path} does not exist.")
    with np.load(path, allow_pickle=False) as data:
      missing = [k for k in saved_features.NPZ_KEYS if k not in data.files]
      if missing:
        raise ValueError(f"{path}: missing keys {missing}; a gallery shard is a "
                         f"saved-features .npz with {list(saved_features.NPZ_KEYS)}.")
      shape, _ = _npy_header(data, path, "feats")
      if len(shape) != 3:
        raise ValueError(f"{path}: feats has shape {shape}, expected (N, P, C).")
      names = data["file_name"]
      signature = str(data["model_signature"])
      source = str(data["model_source"]) if "model_source" in data.files else ""
    if first is None:
      first = (path, shape[1:], signature, source)
    else:
      features.check_signature(signature, first[2], found_where=path,
                                expected_where=first[0])
      if tuple(shape[1:]) != tuple(first[1]):
        raise ValueError(f"{path}: features are {shape[1:]} (P, C), {first[0]}'s "
                         f"are {first[1]}; all shards must come from one model.")
    if len(names) != shape[0]:
      raise ValueError(f"{path}: {len(names)} file names for {shape[0]} features.")
    name_width = max(name_width, max((len(str(s)) for s in names), default=0))
    found.append(_Shard(path, int(shape[0])))
  layout = _Layout(tuple(found), int(first[1][0]), int(first[1][1]), first[2],
                   first[3], name_width)
  if layout.num_items == 0:
    raise ValueError(f"The gallery shards {list(shards)} hold no items.")
  return layout


def _read_shard(shard: _Shard, parts: int, channels: int) -> saved_features.Features:
  features = saved_features.load_features(shard.path)
  if features.feats.shape != (shard.count, parts, channels):
    raise ValueError(f"{shard.path}: feats changed while building the index: "
                     f"{features.feats.shape}, was {(shard.count, parts, channels)}.")
  _check_values(features, shard.path)
  return features


def _check_values(features: saved_features.Features, where: str) -> None:
  """Finite features; areas >= 0 with a positive sum (r > 0, see the docstring)."""
  for name, x in (("feats", features.feats), ("areas", features.areas)):
    bad = ~np.isfinite(x).reshape(len(x), -1).all(axis=1)
    if bad.any():
      raise ValueError(f"{where}: {name} of item {int(np.argmax(bad))} is not finite.")
  bad = (features.areas < 0).any(axis=1) | (features.areas.sum(axis=1) <= 0)
  if bad.any():
    raise ValueError(f"{where}: areas of item {int(np.argmax(bad))} are "
                     f"{features.areas[int(np.argmax(bad))]}; expected >= 0 with a "
                     "positive sum.")


# --------------------------------------------------------------------------
# Index parameters.


@dataclasses.dataclass(frozen=True)
class Spec:
  """What kind of faiss index to build (None / "auto": chosen from the size)."""
  nlist: int | None = None  # inverted lists; auto ~ 4 sqrt(N), >= 39 items a list
  codec: str = "auto"  # flat | sq8 | pq | auto (sq8 from APPROX_FROM items, else flat)
  pq_dims: int = 4  # dimensions per PQ code byte (sub-vector length)
  nprobe: int | None = None  # lists scanned per query by default; auto: see _resolve
  store: str = "float32"  # feature store dtype
  train_size: int | None = None  # training vectors; auto: max(40 nlist, 65536)
  seed: int = 0  # which vectors train the index


def _resolve(spec: Spec, num_items: int, parts: int, channels: int) -> dict[str, Any]:
  """The concrete parameters written to meta.json."""
  if spec.codec not in CODECS:
    raise ValueError(f"codec={spec.codec!r}; expected one of {CODECS}.")
  if spec.store not in STORE_DTYPES:
    raise ValueError(f"store={spec.store!r}; expected one of {STORE_DTYPES}.")
  max_lists = max(1, num_items // 39)  # faiss' k-means wants >= 39 points a centroid
  if spec.nlist is None:
    nlist = min(_bucket(int(4 * np.sqrt(num_items))), 1 << (max_lists.bit_length() - 1))
  elif 1 <= spec.nlist <= num_items:
    nlist = spec.nlist
  else:
    raise ValueError(f"nlist={spec.nlist}; expected 1..{num_items} (the gallery size).")
  codec = spec.codec
  if codec == "auto":
    codec = "sq8" if num_items >= APPROX_FROM else "flat"
  train_size = spec.train_size or max(40 * nlist, 65_536)
  train_size = min(train_size, num_items)
  if train_size < nlist:
    raise ValueError(f"train_size={train_size} < nlist={nlist}.")
  # Blocks of whole PQ sub-vectors, or of 16 floats: faiss' SIMD scanners need a
  # multiple of 16 dimensions (else scalar code).
  block = spec.pq_dims if codec == "pq" else 16
  if block < 1:
    raise ValueError(f"pq_dims={block}; expected >= 1.")
  area_offset = -(-parts * channels // block) * block
  dim = area_offset + -(-2 * parts // block) * block
  if codec == "pq":
    if train_size < 256:
      raise ValueError(f"PQ codes need >= 256 training vectors, the gallery has "
                       f"{train_size}; use codec='flat'.")
    factory = f"IVF{nlist},PQ{dim // block}"
  else:
    factory = f"IVF{nlist},{'SQ8' if codec == 'sq8' else 'Flat'}"
  # Flat codes: scan every list by default, so search is exact (docstring).
  # Otherwise 1/512 of the lists, at least 8: on 1M clustered images (4096 lists,
  # scripts/bench_search.py) 8 gave recall@10 0.9993 at 69x brute force's speed.
  nprobe = spec.nprobe or (nlist if codec == "flat" else min(nlist, max(8, nlist // 512)))
  if not 1 <= nprobe <= nlist:
    raise ValueError(f"nprobe={nprobe}; expected 1..nlist={nlist}.")
  return {"factory": factory, "codec": codec, "nlist": nlist, "parts": parts,
          "area_scale": AREA_SCALE, "area_offset": area_offset, "dim": dim, "nprobe": nprobe,
          "store": spec.store, "train_size": train_size, "seed": spec.seed}


# --------------------------------------------------------------------------
# Building.


def build_index(shards: Sequence[str | os.PathLike], out: str | os.PathLike,
                spec: Spec = Spec(), *, overwrite: bool = False,
                quantizer_from: str | os.PathLike | None = None) -> pathlib.Path:
  """Builds the index folder `out` from saved-features .npz shards, in order.

  Gallery index i is the i-th item of the shards concatenated. Only one shard
  is in memory at a time. Atomic: `out` appears complete or not at all.
  quantizer_from: an index of the same model whose trained quantizer (and
  codebooks, and parameters) to reuse instead of training; `spec` then only
  chooses the store dtype.
  """
  shards = [os.fspath(s) for s in shards]
  out = pathlib.Path(out)
  # Only an index folder is replaced: never a training workdir or any other folder.
  writing.check_replaceable(out, owned=_is_index_folder, what="an index folder",
                            overwrite=overwrite)
  trained = None
  if quantizer_from is None:
    layout = _scan(shards)
    params = _resolve(spec, layout.num_items, layout.parts, layout.channels)
  else:
    source = GalleryIndex(quantizer_from)
    layout = _scan(shards, (str(quantizer_from), (source.meta["parts"],
                                                   source.meta["channels"]),
                            source.model_signature))
    params = dict(source.params, store=spec.store)
    trained = faiss.clone_index(source.ann)
    trained.reset()  # the vectors go; the trained quantizer and codebooks stay
    del source
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
  try:
    _write_store(tmp, layout, params["store"])
    if trained is None:
      ann, z_max = _build_ann(tmp, layout.num_items, params)
    else:
      ann, z_max = trained, _add_items(trained, tmp, params)
    faiss.write_index(ann, str(tmp / ANN))
    meta = {
        "format": FORMAT,
        "model_signature": layout.signature,
        "model_source": layout.source,
        "parts": layout.parts,
        "channels": layout.channels,
        "num_items": layout.num_items,
        "faiss_version": faiss.__version__,
        "params": params,
        "z_max_norm": z_max,
        "shards": [{"path": os.path.abspath(s.path), "items": s.count}
                   for s in layout.shards],
        "ann": ANN,
        "segments": [{"dir": "", "items": layout.num_items,
                      "arrays": _array_layout(layout)}],
        "files": {name: _file_record(tmp / name) for name in FILES},
    }
    _write_meta(tmp / META, meta)
    _move_into_place(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


def _array_layout(layout: _Layout) -> dict[str, Any]:
  n, p = layout.num_items, layout.parts
  return {"areas": {"shape": [n, p], "dtype": "float32"},
          "vehicle_id": {"shape": [n], "dtype": "int64"},
          "camera_id": {"shape": [n], "dtype": "int64"},
          "file_name": {"shape": [n], "dtype": f"<U{layout.name_width}"}}


def _write_store(tmp: pathlib.Path, layout: _Layout, store: str) -> None:
  """Copies the shards' features and labels into memory-mapped .npy files."""
  open_memmap = np.lib.format.open_memmap
  n = layout.num_items
  feats = open_memmap(tmp / FEATS, "w+", np.dtype(store),
                      (n, layout.parts, layout.channels))
  arrays = {key: open_memmap(tmp / name, "w+", np.dtype(a["dtype"]), tuple(a["shape"]))
            for (name, key), a in zip(ARRAYS, _array_layout(layout).values())}
  lo = 0
  for i, shard in enumerate(layout.shards):
    logging.info("Index: copying shard %d/%d (%s, %d items)", i + 1,
                 len(layout.shards), shard.path, shard.count)
    features = _read_shard(shard, layout.parts, layout.channels)
    hi = lo + shard.count
    feats[lo:hi] = features.feats
    arrays["areas"][lo:hi] = features.areas
    arrays["vehicle_id"][lo:hi] = features.ids
    arrays["camera_id"][lo:hi] = features.cams
    arrays["file_name"][lo:hi] = features.file_names
    lo = hi
    del features
  for mm in (feats, *arrays.values()):
    mm.flush()
  del feats, arrays


def _write_meta(path: pathlib.Path, meta: dict[str, Any]) -> None:
  with open(path, "w") as f:
    json.dump(meta, f, indent=1)
    f.flush()
    os.fsync(f.fileno())


def _add_items(ann, folder: pathlib.Path, params: dict[str, Any]) -> float:
  """Adds the z of a written store (folder) to `ann`, in order; the largest |z|."""
  feats = np.load(folder / FEATS, mmap_mode="r")
  areas = np.load(folder / "areas.npy")
  num_items, z_max = len(areas), 0.0
  for lo in range(0, num_items, ADD_CHUNK):
    hi = min(lo + ADD_CHUNK, num_items)
    z = _place(gallery_vectors(feats[lo:hi], areas[lo:hi]), params)
    z_max = max(z_max, float(np.sqrt(np.max(np.einsum("nd,nd->n", z, z)))))
    ann.add(z)
    logging.info("Index: added %d/%d", hi, num_items)
  return z_max


def _build_ann(tmp: pathlib.Path, num_items: int, params: dict[str, Any]):
  """Trains the faiss index on a seeded sample of z, then adds every item in order."""
  feats = np.load(tmp / FEATS, mmap_mode="r")
  areas = np.load(tmp / "areas.npy")
  rng = np.random.default_rng(params["seed"])
  sample = np.sort(rng.choice(num_items, params["train_size"], replace=False))
  logging.info("Index: training %s on %d vectors of dimension %d", params["factory"],
               len(sample), params["dim"])
  ann = faiss.index_factory(params["dim"], params["factory"], faiss.METRIC_INNER_PRODUCT)
  if params["codec"] == "pq":
    # The factory turns on polysemous training (slow annealing) for a Hamming
    # filter this search does not use.
    faiss.downcast_index(ann).do_polysemous_training = False
  ann.train(_place(gallery_vectors(feats[sample], areas[sample]), params))
  return ann, _add_items(ann, tmp, params)


# --------------------------------------------------------------------------
# Growing.

APPEND_LOCK = ".append.lock"


def _segments(meta: dict[str, Any]) -> list[dict[str, Any]]:
  """Each segment's folder ("": the index folder), item count and array layout."""
  if "segments" in meta:
    return meta["segments"]
  return [{"dir": "", "items": meta["num_items"], "arrays": meta["arrays"]}]  # format /1


def _in_segment(segment: dict[str, Any], name: str) -> str:
  return f"{segment['dir']}/{name}" if segment["dir"] else name


def _remove_leftovers(path: pathlib.Path, meta: dict[str, Any]) -> None:
  """What a killed append left: segment folders, faiss files and temporaries that
  meta.json does not name."""
  named = {name.split("/")[0] for name in meta["files"]}
  for entry in path.iterdir():
    ours = (entry.name.startswith(("seg-", ".seg-", ".ann-", f".{META}."))
            or (entry.name.startswith("ann-") and entry.name.endswith(".faiss")))
    if ours and entry.name not in named:
      logging.info("Index: removing %s, left by an interrupted append", entry)
      if entry.is_dir():
        shutil.rmtree(entry)
      else:
        entry.unlink()


def append(index: str | os.PathLike, shards: Sequence[str | os.PathLike]) -> pathlib.Path:
  """Adds saved-features .npz shards to an index folder without training it again.

  The new items follow the old ones (gallery index len(index) + i). Shards of
  another model (signature) or feature layout are refused. Atomic: a new
  meta.json replaces the old one by a rename once every new file is written
  and synced; the old files are not modified (module docstring).
  """
  path = pathlib.Path(index)
  shards = [os.fspath(s) for s in shards]
  _read_meta(path)  # a clear error for a missing or unfinished folder
  lock = writing.WorkdirLock(path, APPEND_LOCK)
  try:
    lock.acquire()
  except writing.WorkdirLockedError:
    raise writing.WorkdirLockedError(
        f"{path}: another append to this index is running "
        f"({writing.read_holder(lock.path) or 'holder unknown'}); wait for it.") from None
  try:
    base = GalleryIndex(path)  # checks every file the current meta.json names
    meta, params = base.meta, base.params
    layout = _scan(shards, (str(path), (meta["parts"], meta["channels"]),
                            meta["model_signature"]))
    _remove_leftovers(path, meta)
    segments = _segments(meta)
    number = len(segments)
    seg_name, ann_name = f"seg-{number:04d}", f"ann-{number:04d}.faiss"
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{seg_name}.writing-", dir=path))
    _write_store(tmp, layout, params["store"])
    z_max = _add_items(base.ann, tmp, params)
    faiss.write_index(base.ann, str(tmp / ANN))
    records = {name: _file_record(tmp / name) for name in FILES}
    os.rename(tmp / ANN, path / f".{ann_name}")
    os.rename(tmp, path / seg_name)
    os.rename(path / f".{ann_name}", path / ann_name)
    old_ann = meta.get("ann", ANN)
    files = {name: record for name, record in meta["files"].items() if name != old_ann}
    files[ann_name] = records.pop(ANN)
    files.update({f"{seg_name}/{name}": record for name, record in records.items()})
    new = {key: value for key, value in meta.items() if key != "arrays"}
    new.update(
        format=FORMAT, num_items=meta["num_items"] + layout.num_items,
        faiss_version=faiss.__version__, z_max_norm=max(meta["z_max_norm"], z_max),
        shards=meta["shards"] + [{"path": os.path.abspath(s.path), "items": s.count}
                                 for s in layout.shards],
        ann=ann_name, segments=segments + [{"dir": seg_name, "items": layout.num_items,
                                            "arrays": _array_layout(layout)}],
        files=files)
    staged = path / f".{META}.{os.getpid()}"
    _write_meta(staged, new)
    _sync_folder(path)
    os.replace(staged, path / META)  # the commit
    _sync_folder(path)
    if old_ann != ann_name:
      (path / old_ann).unlink(missing_ok=True)
  finally:
    lock.release()
  return path


def _sync_folder(path: pathlib.Path) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _file_record(path: pathlib.Path) -> dict[str, Any]:
  """Size and SHA-256 of a written file, synced to disk first."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    os.fsync(f.fileno())
    for block in iter(functools.partial(f.read, 1 << 24), b""):
      digest.update(block)
  return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _is_index_folder(path: str | os.PathLike) -> bool:
  """Whether `path` holds an index this module wrote (its meta.json and format)."""
  try:
    meta = json.loads((pathlib.Path(path) / META).read_text())
  except (OSError, ValueError):
    return False
  return isinstance(meta, dict) and meta.get("format") in FORMATS


def _move_into_place(tmp: pathlib.Path, out: pathlib.Path) -> None:
  """Renames tmp to out (replacing an old out only once the new one is complete)."""
  if not out.exists():
    os.rename(tmp, out)
  else:
    old = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, old / out.name)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
  dir_fd = os.open(out.parent, os.O_RDONLY)
  try:
    os.fsync(dir_fd)
  finally:
    os.close(dir_fd)


# --------------------------------------------------------------------------
# Opening and searching.


def _read_meta(path: pathlib.Path) -> dict[str, Any]:
  if not path.is_dir():
    raise FileNotFoundError(f"Index {path} does not exist (build it with "
                            "`python -m musp_jax.search index`).")
  meta_path = path / META
  if not meta_path.is_file():
    raise IndexFileError(
        f"{path} is not a finished index: {meta_path} is missing (an interrupted "
        "build leaves such a folder; delete it and build again).")
  try:
    meta = json.loads(meta_path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise IndexFileError(f"{meta_path} is corrupt (not valid JSON: {e}).") from e
  if not isinstance(meta, dict) or meta.get("format") not in FORMATS:
    found = meta.get("format") if isinstance(meta, dict) else None
    raise IndexFileError(f"{meta_path}: format {found!r}, this version reads "
                         f"{' and '.join(map(repr, FORMATS))}.")
  return meta


def _check_file(path: pathlib.Path, record: dict[str, Any], *, hash_it: bool) -> None:
  if not path.is_file():
    raise IndexFileError(f"{path} is missing from the index.")
  size = path.stat().st_size
  if size != record["bytes"]:
    raise IndexFileError(f"{path} is truncated or corrupt: {size} bytes, the index "
                         f"recorded {record['bytes']}.")
  if hash_it:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
      for block in iter(functools.partial(f.read, 1 << 24), b""):
        digest.update(block)
    if digest.hexdigest() != record["sha256"]:
      raise IndexFileError(f"{path} is corrupt: its SHA-256 differs from the one "
                           "recorded when the index was built.")


def _load_npy(path: pathlib.Path, shape: Sequence[int], dtype: Any, *,
              mmap: bool) -> np.ndarray:
  try:
    x = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise IndexFileError(f"{path} is corrupt: {e}") from e
  if x.shape != tuple(shape) or x.dtype != np.dtype(dtype):
    raise IndexFileError(f"{path} holds {x.dtype} {x.shape}, the index recorded "
                         f"{np.dtype(dtype)} {tuple(shape)}.")
  return x


class _SegmentRows:
  """The feature stores of several segments, read as one (N, P, C) array by rows."""

  def __init__(self, stores: Sequence[np.ndarray]):
    self.stores = list(stores)
    self.starts = np.cumsum([0] + [len(x) for x in self.stores])
    self.shape = (int(self.starts[-1]),) + self.stores[0].shape[1:]
    self.dtype = self.stores[0].dtype

  def __len__(self) -> int:
    return self.shape[0]

  def __getitem__(self, index: np.ndarray) -> np.ndarray:
    index = np.asarray(index)
    out = np.empty(index.shape + self.shape[1:], self.dtype)
    segment = np.searchsorted(self.starts, index, side="right") - 1
    for s, store in enumerate(self.stores):
      hit = segment == s
      if hit.any():
        out[hit] = store[index[hit] - self.starts[s]]
    return out


class GalleryIndex:
  """An opened index folder: the faiss index, the memory-mapped feature store."""

  def __init__(self, path: str | os.PathLike, *, verify_features: bool = False):
    self.path = pathlib.Path(path)
    meta = _read_meta(self.path)
    try:
      files, params = meta["files"], meta["params"]
      n, p, c = meta["num_items"], meta["parts"], meta["channels"]
      segments, ann_name = _segments(meta), meta.get("ann", ANN)
      names = [ann_name] + [_in_segment(seg, name) for seg in segments
                            for name in FILES if name != ANN]
      for name in names:
        _check_file(self.path / name, files[name],
                    hash_it=verify_features or os.path.basename(name) != FEATS)
      if sum(seg["items"] for seg in segments) != n:
        raise IndexFileError(f"{self.path / META}: its segments hold "
                             f"{sum(seg['items'] for seg in segments)} items, not {n}.")
    except (KeyError, TypeError) as e:
      raise IndexFileError(f"{self.path / META} is incomplete: no {e}.") from e
    if params.get("area_scale") != AREA_SCALE:
      raise IndexFileError(f"{self.path / META}: built with area scale "
                           f"{params.get('area_scale')}, this version uses {AREA_SCALE}; "
                           "build the index again.")
    self.meta = meta
    self.params = params
    stores, columns = [], {key: [] for _, key in ARRAYS}
    for seg in segments:
      stores.append(_load_npy(self.path / _in_segment(seg, FEATS), (seg["items"], p, c),
                              params["store"], mmap=True))
      for name, key in ARRAYS:
        layout = seg["arrays"][key]
        columns[key].append(_load_npy(self.path / _in_segment(seg, name),
                                      layout["shape"], layout["dtype"],
                                      mmap=key != "areas"))
    # One segment: the memory maps themselves; several: rows gathered across them.
    self.feats = stores[0] if len(stores) == 1 else _SegmentRows(stores)
    self.areas, self.ids, self.cams, self.file_names = (
        parts[0] if len(parts) == 1 else np.concatenate(parts)
        for parts in (columns[key] for _, key in ARRAYS))
    ann_path = self.path / ann_name
    try:
      self.ann = faiss.read_index(str(ann_path))
    except RuntimeError as e:
      raise IndexFileError(
          f"{ann_path}: faiss {faiss.__version__} cannot read it (written by "
          f"faiss {meta['faiss_version']}): {e}") from e
    if self.ann.ntotal != n or self.ann.d != params["dim"]:
      raise IndexFileError(f"{ann_path} holds {self.ann.ntotal} vectors of "
                           f"dimension {self.ann.d}, the index recorded {n} of "
                           f"{params['dim']}.")
    self._ivf = ivf = faiss.extract_index_ivf(self.ann)
    self._centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    # u(t) - u(2) = (t - 2) a_q / AREA_SCALE on the area block (pass 2).
    offset = params["area_offset"]
    self._centroid_areas = self._centroids[:, offset:offset + p] / AREA_SCALE

  def __len__(self) -> int:
    return int(self.meta["num_items"])

  @property
  def model_signature(self) -> str:
    return self.meta["model_signature"]

  @property
  def model_source(self) -> str:
    return self.meta["model_source"]

  def exhaustive(self, nprobe: int | None = None) -> bool:
    """Whether every item is scored exactly (so search is exact, see docstring)."""
    nprobe = nprobe or self.params["nprobe"]
    return self.params["codec"] == "flat" and nprobe >= self.params["nlist"]

  def search(self, query: saved_features.Features, k: int = 10, *, nprobe: int | None = None,
             candidates: int | None = None, query_block: int = 256
             ) -> tuple[np.ndarray, np.ndarray]:
    """(distances, gallery indices), each (Q, k), in ascending (distance, index).

    Distances are exact cam_squared distances. Where fewer than k candidates
    were found (a non-exhaustive index with few items in the probed lists), the
    row ends in distance inf, index -1.
    """
    p, c = self.meta["parts"], self.meta["channels"]
    if query.feats.shape[1:] != (p, c):
      raise features.SignatureMismatchError(
          f"Query features are {query.feats.shape[1:]} (P, C), the index's "
          f"({self.path}) {(p, c)}: they come from different models.")
    _check_values(query, "query features")
    nprobe = nprobe or self.params["nprobe"]
    if not 1 <= nprobe <= self.params["nlist"]:
      raise ValueError(f"nprobe={nprobe}; expected 1..{self.params['nlist']} (nlist).")
    candidates = candidates or 2 * k
    if k < 1 or candidates < 1:
      raise ValueError(f"k={k}, candidates={candidates}; expected >= 1.")
    k = min(k, len(self))
    dist = np.empty((len(query), k), np.float32)
    index = np.empty((len(query), k), np.int64)
    for lo in range(0, len(query), query_block):
      hi = min(lo + query_block, len(query))
      dist[lo:hi], index[lo:hi] = self._search_block(
          query.feats[lo:hi], query.areas[lo:hi], k, nprobe, max(candidates, k))
    return dist, index

  def _scan(self, u_BxD: np.ndarray, lists_BxL: np.ndarray, coarse_BxL: np.ndarray,
            count: int):
    """faiss' top `count` scores of u in the given lists (coarse: u . centroid)."""
    self._ivf.nprobe = lists_BxL.shape[1]  # the wrapper checks the lists' shape by it
    return self._ivf.search_preassigned(u_BxD, min(count, len(self)), lists_BxL,
                                        coarse_BxL)

  def _exact(self, qf: np.ndarray, qa: np.ndarray, idx_BxK: np.ndarray) -> np.ndarray:
    """Exact distances to candidates (inf where the index returned none)."""
    b, k = idx_BxK.shape
    bb, kk = _bucket(b), _bucket(k)
    safe = np.zeros((bb, kk), np.int64)
    safe[:b, :k] = np.maximum(idx_BxK, 0)
    cand_feats = np.asarray(self.feats[safe.reshape(-1)], np.float32).reshape(
        bb, kk, *self.feats.shape[1:])
    qf_pad = np.zeros((bb, *qf.shape[1:]), np.float32)
    qa_pad = np.ones((bb, qa.shape[1]), np.float32)
    qf_pad[:b], qa_pad[:b] = qf, qa
    d = np.asarray(_candidate_distance(qf_pad, qa_pad, cand_feats, self.areas[safe]))
    return np.where(idx_BxK >= 0, d[:b, :k], np.inf).astype(np.float32)

  def _search_block(self, qf, qa, k, nprobe, candidates):
    # Pass 1: t = 2, the area-scaled inner product.
    u1 = _place(query_vectors(qf, qa, 2.0), self.params)
    coarse1, lists = self._ivf.quantizer.search(u1, nprobe)
    _, i1 = self._scan(u1, lists, coarse1, candidates)
    d1 = self._exact(qf, qa, i1)
    kth = np.partition(d1, k - 1, axis=1)[:, k - 1]
    threshold = np.where(np.isfinite(kth), kth, 2.0).astype(np.float32)
    # Pass 2: t = d, the k-th distance found, in the same lists; u(t) - u(2) is
    # (t - 2) a_q / AREA_SCALE on the area block, so a centroid's score moves by
    # (t - 2) a_q . (its area block) / AREA_SCALE. Widened until certified if
    # exhaustive.
    u2 = _place(query_vectors(qf, qa, threshold), self.params)
    coarse2 = coarse1 + (threshold - 2.0)[:, None] * np.einsum(
        "bp,blp->bl", qa, self._centroid_areas[lists])
    count = candidates
    while True:
      s2, i2 = self._scan(u2, lists, coarse2, count)
      if not self.exhaustive(nprobe) or s2.shape[1] >= len(self):
        break
      # m < 0 beyond float32 rounding of the scores (see the module docstring).
      margin = 1e-5 * np.linalg.norm(u2, axis=1) * self.meta["z_max_norm"]
      if np.all((i2[:, -1] < 0) | (s2[:, -1] < -margin)):
        break
      count *= 2
    d2 = self._exact(qf, qa, i2)
    return _merge_top_k(np.concatenate([d1, d2], 1), np.concatenate([i1, i2], 1), k)


def _merge_top_k(dist_BxK: np.ndarray, idx_BxK: np.ndarray, k: int
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Top k by (distance, index) of candidates that may repeat or be missing (-1)."""
  order = np.argsort(idx_BxK, axis=1, kind="stable")
  idx = np.take_along_axis(idx_BxK, order, 1)
  dist = np.take_along_axis(dist_BxK, order, 1)
  repeat = np.zeros_like(idx, bool)
  repeat[:, 1:] = idx[:, 1:] == idx[:, :-1]
  dist = np.where(repeat | (idx < 0), np.inf, dist)
  idx = np.where(np.isfinite(dist), idx, -1)
  top = np.lexsort((np.where(idx < 0, np.iinfo(np.int64).max, idx), dist), axis=1)[:, :k]
  return np.take_along_axis(dist, top, 1), np.take_along_axis(idx, top, 1)
