"""The approximate gallery index: exactness when exhaustive, files, failures."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

import test_ranking
from musp_jax.retrieval import gallery_index as index_lib
from musp_jax.core import features
from musp_jax.retrieval import ranking
from musp_jax.retrieval import saved_features
from musp_jax import search

SIGNATURE = json.dumps({"head": "musp", "parts": 3, "channels": 8, "weights": "00ff"},
                       sort_keys=True)


def _features(rng, num_ids, per_id, *, parts=3, channels=8, prefix="g",
              signature=SIGNATURE):
  """Clustered features: identity centres plus noise, varied areas (docs/design.md
  section 4)."""
  centres = rng.standard_normal((num_ids, parts, channels))
  ids = np.repeat(np.arange(num_ids), per_id)
  feats = features.l2_normalize(
      centres[ids] + 0.6 * rng.standard_normal((len(ids), parts, channels)))
  areas = np.empty((len(ids), parts), np.float32)
  areas[:, :-1] = rng.dirichlet(np.full(parts - 1, 2.0), len(ids))
  areas[:, -1] = 1.0 / (parts - 1)  # the global branch's pseudo-area
  names = np.array([f"{prefix}{i:04d}.jpg" for i in range(len(ids))])
  return saved_features.Features(feats.astype(np.float32), areas, ids,
                            np.arange(len(ids)) % 4, names, signature)


def _cam_squared_reference(qf, qa, gf, ga):
  """sum_p w_p ||f_q^p - f_g^p||^2, w_p = a_q^p a_g^p / sum_j a_q^j a_g^j, by loops."""
  out = np.zeros((len(qf), len(gf)))
  for i in range(len(qf)):
    for j in range(len(gf)):
      w = qa[i] * ga[j] / np.sum(qa[i] * ga[j])
      out[i, j] = sum(w[p] * np.sum((qf[i, p] - gf[j, p]) ** 2) for p in range(len(w)))
  return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("index")
  rng = np.random.default_rng(0)
  gallery = _features(rng, 60, 5)
  # Exact duplicates: equal distances, so the tie order (gallery index) is tested.
  dup = np.array([3, 3, 117, 250])
  gallery = saved_features.Features(
      np.concatenate([gallery.feats, gallery.feats[dup]]),
      np.concatenate([gallery.areas, gallery.areas[dup]]),
      np.concatenate([gallery.ids, gallery.ids[dup]]),
      np.concatenate([gallery.cams, gallery.cams[dup]]),
      np.concatenate([gallery.file_names, [f"dup{i}.jpg" for i in range(len(dup))]]),
      SIGNATURE)
  query = _features(np.random.default_rng(1), 60, 1, prefix="q")
  query = query.take(np.arange(0, 60, 2))
  gallery_npz, query_npz = root / "gallery.npz", root / "query.npz"
  saved_features.save_features(gallery_npz, gallery)
  saved_features.save_features(query_npz, query)
  # Exhaustive: flat codes, every list probed (the default for flat codes).
  exhaustive = index_lib.build_index([gallery_npz], root / "exhaustive.index",
                               index_lib.Spec(nlist=8, codec="flat"))
  return root, gallery, query, gallery_npz, query_npz, exhaustive


def test_index_vectors_give_the_cam_distance():
  """u_q(t) . z_g = r (t - D(q, g)) for any features, not only L2-normalised ones."""
  rng = np.random.default_rng(5)
  qf, gf = rng.standard_normal((4, 3, 6)), rng.standard_normal((7, 3, 6))
  qa, ga = rng.uniform(0.1, 1, (4, 3)), rng.uniform(0.1, 1, (7, 3))
  t = np.array([0.3, 2.0, 5.0, -1.0])
  scores = index_lib.query_vectors(qf, qa, t) @ index_lib.gallery_vectors(gf, ga).T
  expected = (qa @ ga.T) * (t[:, None] - _cam_squared_reference(qf, qa, gf, ga))
  # float32 vectors of 3 x 6 + 6 entries (of size up to 5 here) dotted, against float64
  # loops: (18 + 6) u x 25 = 3.6e-5 worst case; measured 1.2% of rtol = atol = 1e-5.
  np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.numerics
def test_exhaustive_index_returns_the_exact_top_k(data):
  _, gallery, query, _, _, path = data
  built = index_lib.GalleryIndex(path)
  assert built.exhaustive() and built.params["factory"] == "IVF8,Flat"
  ref = _cam_squared_reference(query.feats, query.areas, gallery.feats, gallery.areas)
  order = np.argsort(ref, axis=1, kind="stable")[:, :10]
  # candidates=k: pass 1 alone misses items, so the certificate must widen pass 2.
  for candidates in (10, 100):
    dist, idx = built.search(query, 10, candidates=candidates)
    np.testing.assert_array_equal(idx, order)
    # float32 exact re-ranking of unit features (P = 3, C = 8) against float64 loops:
    # test_ranking.cam_distance_atol(3, 8) = 7.2e-6; measured 3.6e-7 (AVX2, AVX).
    np.testing.assert_allclose(dist, np.take_along_axis(ref, order, 1), atol=1e-5)
  # Queries that are gallery items, duplicated twice: ties in gallery order.
  dist, idx = built.search(gallery.take(np.array([3, 117])), 4)
  np.testing.assert_array_equal(idx[0, :3], [3, 300, 301])
  np.testing.assert_array_equal(idx[1, :2], [117, 302])
  # An item against itself: the expanded form's residue, clamped at 0 (measured 0).
  np.testing.assert_allclose(dist[:, 0], 0.0, atol=1e-6)


def test_cli_index_mode_equals_brute_force(data, tmp_path, capsys):
  root, _, _, gallery_npz, query_npz, _ = data
  shards = []
  with np.load(gallery_npz) as f:
    full = dict(f)
  for lo, hi in ((0, 100), (100, 101), (101, 304)):  # uneven, one of a single item
    shards.append(tmp_path / f"shard{lo}.npz")
    np.savez(shards[-1], **{k: (v[lo:hi] if v.ndim else v) for k, v in full.items()})
  out = tmp_path / "cli.index"
  assert search.main(["index", "--gallery", *map(str, shards), "--out", str(out)]) == 0
  assert "304 images from 3 shard(s)" in capsys.readouterr().out
  results = {}
  for mode, path in (("--gallery", gallery_npz), ("--index", out)):
    assert search.main([mode, str(path), "--query", str(query_npz), "--topk", "10",
                        "--json", "-"]) == 0
    results[mode] = json.loads(capsys.readouterr().out)["queries"]
  for brute, indexed in zip(results["--gallery"], results["--index"]):
    assert [r["gallery_index"] for r in indexed["results"]] == [
        r["gallery_index"] for r in brute["results"]]
    assert [r["file_name"] for r in indexed["results"]] == [
        r["file_name"] for r in brute["results"]]
    # Two float32 programs of the distance: twice test_ranking.cam_distance_atol
    # (atol=1e-6 was 33% used on AVX: 3.6e-7).
    np.testing.assert_allclose([r["distance"] for r in indexed["results"]],
                               [r["distance"] for r in brute["results"]],
                               atol=2 * test_ranking.cam_distance_atol(3, 8))
  # An existing index is not overwritten without --overwrite.
  assert search.main(["index", "--gallery", str(gallery_npz), "--out", str(out)]) == 1
  assert "exists" in capsys.readouterr().err
  # Nor is any folder that is not an index, even with --overwrite (a training workdir).
  workdir = tmp_path / "workdir"
  (workdir / "checkpoints").mkdir(parents=True)
  assert search.main(["index", "--gallery", str(gallery_npz), "--out", str(workdir),
                      "--overwrite"]) == 1
  assert (f"error: {workdir} exists and is not an index folder; refusing to replace it, "
          "even with --overwrite.") in capsys.readouterr().err
  assert [p.name for p in workdir.iterdir()] == ["checkpoints"]


def test_multi_shard_build_equals_single_file_build(data, tmp_path):
  root, gallery, query, gallery_npz, _, single = data
  shards = []
  for i, part in enumerate(np.array_split(np.arange(len(gallery)), 3)):
    shards.append(tmp_path / f"part{i}.npz")
    saved_features.save_features(shards[-1], gallery.take(part))
  multi = index_lib.build_index(shards, tmp_path / "multi.index",
                          index_lib.Spec(nlist=8, codec="flat"))
  meta_single = json.loads((single / "meta.json").read_text())
  meta_multi = json.loads((multi / "meta.json").read_text())
  assert meta_multi["files"] == meta_single["files"]  # every file byte for byte
  assert len(meta_multi["shards"]) == 3
  a, b = index_lib.GalleryIndex(single), index_lib.GalleryIndex(multi)
  for x, y in zip(a.search(query, 10), b.search(query, 10)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("codec,candidates,min_recall", [("sq8", 50, 0.99),
                                                          ("pq", 100, 0.95)])
def test_approximate_index_returns_exact_distances(tmp_path, codec, candidates,
                                                   min_recall):
  rng = np.random.default_rng(2)
  gallery = _features(rng, 300, 4, channels=16)
  query = _features(np.random.default_rng(3), 300, 1, channels=16, prefix="q").take(
      np.arange(40))
  saved_features.save_features(tmp_path / "g.npz", gallery)
  path = index_lib.build_index([tmp_path / "g.npz"], tmp_path / "approx.index",
                         index_lib.Spec(codec=codec, nlist=4, pq_dims=8, nprobe=2,
                                        store="float16"))
  built = index_lib.GalleryIndex(path)
  assert built.params["factory"] == {"sq8": "IVF4,SQ8", "pq": "IVF4,PQ7"}[codec]
  assert not built.exhaustive() and built.feats.dtype == np.float16
  dist, idx = built.search(query, 10, candidates=20)
  # Distances are exact for the stored (float16-rounded) features, in order.
  stored = saved_features.Features(gallery.feats.astype(np.float16).astype(np.float32),
                              gallery.areas, gallery.ids, gallery.cams)
  ref = ranking.distance_matrix(query, stored)
  # Two float32 programs: 2 x test_ranking.cam_distance_atol(3, 8) = 1.4e-5 at
  # most; measured 4.8e-7 (AVX2 and AVX).
  np.testing.assert_allclose(dist, np.take_along_axis(ref, idx, 1), atol=1e-5)
  assert np.all(np.diff(dist, axis=1) >= 0)
  exact = np.argsort(ref, axis=1, kind="stable")[:, :10]
  # Every list probed: only the codes' approximate scores can lose items.
  _, idx_all_lists = built.search(query, 10, nprobe=4, candidates=candidates)
  recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(idx_all_lists, exact)])
  assert recall >= min_recall, recall
  # Every list probed and every item a candidate: the exact top 10.
  _, idx_all = built.search(query, 10, nprobe=4, candidates=len(gallery))
  np.testing.assert_array_equal(idx_all, exact)


def test_model_signature_mismatch_is_refused_by_name(data, tmp_path, capsys):
  _, gallery, query, _, _, path = data
  other = json.loads(SIGNATURE)
  other.update(weights="1234", num_prototypes=5)
  other_query = tmp_path / "other.npz"
  saved_features.save_features(other_query, saved_features.Features(
      query.feats, query.areas, query.ids, query.cams, query.file_names,
      json.dumps(other, sort_keys=True)))
  assert search.main(["--index", str(path), "--query", str(other_query)]) == 1
  err = capsys.readouterr().err
  assert "another model" in err and "weights" in err and "num_prototypes" in err
  assert str(path) in err
  # Shards of two models are refused when building, naming the field.
  with pytest.raises(features.SignatureMismatchError, match=r"(?s)weights.*1234"):
    index_lib.build_index([data[3], other_query], tmp_path / "mixed.index")
  assert not (tmp_path / "mixed.index").exists()
  # Features of another layout (P, C) are refused by search.
  with pytest.raises(features.SignatureMismatchError, match=r"\(P, C\)"):
    index_lib.GalleryIndex(path).search(_features(np.random.default_rng(0), 2, 1,
                                                  parts=2), 3)


def _copy(path, tmp_path, name):
  return pathlib.Path(shutil.copytree(path, tmp_path / name))


def test_truncated_or_corrupt_index_fails_naming_the_file(data, tmp_path):
  path = data[5]
  for name in ("ann.faiss", "feats.npy", "file_name.npy"):
    broken = _copy(path, tmp_path, f"trunc_{name}")
    target = broken / name
    target.write_bytes(target.read_bytes()[:target.stat().st_size // 2])
    with pytest.raises(index_lib.IndexFileError, match=rf"{target}.*truncated"):
      index_lib.GalleryIndex(broken)
  # Same size, changed bytes: the hash catches it before faiss reads the file.
  broken = _copy(path, tmp_path, "flipped")
  raw = bytearray((broken / "ann.faiss").read_bytes())
  raw[len(raw) // 2] ^= 0xFF
  (broken / "ann.faiss").write_bytes(bytes(raw))
  with pytest.raises(index_lib.IndexFileError, match=rf"{broken / 'ann.faiss'}.*corrupt"):
    index_lib.GalleryIndex(broken)
  # The feature store's hash is checked on request.
  broken = _copy(path, tmp_path, "flipped_feats")
  raw = bytearray((broken / "feats.npy").read_bytes())
  raw[-1] ^= 0xFF
  (broken / "feats.npy").write_bytes(bytes(raw))
  index_lib.GalleryIndex(broken)
  with pytest.raises(index_lib.IndexFileError, match=rf"{broken / 'feats.npy'}.*corrupt"):
    index_lib.GalleryIndex(broken, verify_features=True)
  broken = _copy(path, tmp_path, "bad_meta")
  (broken / "meta.json").write_text('{"format": "musp_jax.index/1", "files"')
  with pytest.raises(index_lib.IndexFileError, match=rf"{broken / 'meta.json'}.*corrupt"):
    index_lib.GalleryIndex(broken)


def _leftovers(folder: pathlib.Path, name: str) -> list[pathlib.Path]:
  return sorted(folder.glob(f".{name}.*"))


def test_failed_build_leaves_nothing_and_keeps_the_old_index(data, tmp_path, monkeypatch):
  _, _, query, gallery_npz, _, _ = data
  out = tmp_path / "g.index"

  def fail(*args, **kwargs):
    raise RuntimeError("disk full")

  monkeypatch.setattr(index_lib.faiss, "write_index", fail)
  with pytest.raises(RuntimeError, match="disk full"):
    index_lib.build_index([gallery_npz], out)
  assert not out.exists() and not _leftovers(tmp_path, out.name)
  monkeypatch.undo()
  # A rebuild over an existing index that fails leaves the old one intact.
  index_lib.build_index([gallery_npz], out)
  before = index_lib.GalleryIndex(out).search(query, 5)
  monkeypatch.setattr(index_lib.faiss, "write_index", fail)
  with pytest.raises(RuntimeError, match="disk full"):
    index_lib.build_index([gallery_npz], out, overwrite=True)
  for x, y in zip(before, index_lib.GalleryIndex(out).search(query, 5)):
    np.testing.assert_array_equal(x, y)
  assert not _leftovers(tmp_path, out.name)


def test_killed_build_leaves_no_usable_looking_index(data, tmp_path):
  """SIGKILL while writing (no clean-up can run): only an unfinished hidden folder."""
  gallery_npz = data[3]
  out = tmp_path / "killed.index"
  code = ("import os, signal, sys, faiss\n"
          "faiss.write_index = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
          "from musp_jax import search\n"
          "sys.exit(search.main(sys.argv[1:]))\n")
  env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).parents[1]))
  proc = subprocess.run([sys.executable, "-c", code, "index", "--gallery",
                         str(gallery_npz), "--out", str(out)],
                        env=env, capture_output=True, timeout=300, check=False)
  assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
  assert not out.exists()
  left = _leftovers(tmp_path, out.name)
  assert len(left) == 1 and (left[0] / "feats.npy").exists()
  with pytest.raises(index_lib.IndexFileError, match="not a finished index"):
    index_lib.GalleryIndex(left[0])


# --------------------------------------------------------------------------
# Growing an index.


def _shards(data, root: pathlib.Path) -> list[pathlib.Path]:
  """The gallery of `data` as three shards (days)."""
  gallery = saved_features.load_features(data[3])
  paths = []
  for day, index in enumerate(np.array_split(np.arange(len(gallery)), 3)):
    paths.append(root / f"day{day}.npz")
    saved_features.save_features(paths[-1], gallery.take(index))
  return paths


def test_append_equals_a_build_with_the_same_quantizer(data, tmp_path, capsys):
  query = data[2]
  days = _shards(data, tmp_path)
  spec = index_lib.Spec(nlist=4, codec="sq8", nprobe=2)
  grown = index_lib.build_index(days[:1], tmp_path / "grown.index", spec)
  shutil.copytree(grown, tmp_path / "day0.index")
  assert search.main(["index", "--append", "--gallery", str(days[1]), "--index",
                      str(grown)]) == 0
  assert "Appended 101 images" in capsys.readouterr().out
  for bad in (["--out", str(tmp_path / "x.index")], ["--codec", "pq"]):
    with pytest.raises(SystemExit):  # a build's options, refused with --append
      search.main(["index", "--append", "--gallery", str(days[2]), "--index", str(grown),
                   *bad])
  index_lib.append(grown, days[2:])
  full = index_lib.build_index(days, tmp_path / "full.index", spec,
                         quantizer_from=tmp_path / "day0.index")
  a, b = index_lib.GalleryIndex(grown, verify_features=True), index_lib.GalleryIndex(full)
  assert len(a) == len(b) == 304 and len(a.meta["segments"]) == 3
  assert bytes(index_lib.faiss.serialize_index(a.ann)) == bytes(
      index_lib.faiss.serialize_index(b.ann))
  for x, y in zip((a.areas, a.ids, a.cams, a.file_names), (b.areas, b.ids, b.cams,
                                                           b.file_names)):
    np.testing.assert_array_equal(x, y)
  for x, y in zip(a.search(query, 10, nprobe=4), b.search(query, 10, nprobe=4)):
    np.testing.assert_array_equal(x, y)
  # Another model's day is refused by name, before anything is written.
  other = saved_features.load_features(days[0])
  sig = json.dumps({**json.loads(SIGNATURE), "weights": "1234"}, sort_keys=True)
  saved_features.save_features(tmp_path / "other.npz", saved_features.Features(
      other.feats, other.areas, other.ids, other.cams, other.file_names, sig))
  with pytest.raises(features.SignatureMismatchError, match="weights"):
    index_lib.append(grown, [tmp_path / "other.npz"])
  assert len(index_lib.GalleryIndex(grown)) == 304


@pytest.mark.parametrize("kill_at", ["faiss.write_index", "commit"])
def test_killed_append_leaves_the_old_index(data, tmp_path, kill_at):
  """SIGKILL while appending (writing the codes, or with everything written just
  before meta.json is replaced): the old index opens, verifies and searches as
  before; the next append removes what was left and succeeds."""
  query = data[2]
  days = _shards(data, tmp_path)
  out = index_lib.build_index(days[:2], tmp_path / "city.index", index_lib.Spec(nlist=4))
  before = index_lib.GalleryIndex(out).search(query, 5)
  target = ("faiss.write_index" if kill_at != "commit" else "index._sync_folder")
  code = ("import os, signal, sys\n"
          "from musp_jax.retrieval import gallery_index as index\n"
          "faiss = index.faiss\n"
          f"{target} = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
          "index.append(sys.argv[1], sys.argv[2:])\n")
  env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).parents[1]))
  proc = subprocess.run([sys.executable, "-c", code, str(out), str(days[2])], env=env,
                        capture_output=True, timeout=300, check=False)
  assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
  left = index_lib.GalleryIndex(out, verify_features=True)
  assert len(left) == 203
  for x, y in zip(before, left.search(query, 5)):
    np.testing.assert_array_equal(x, y)
  index_lib.append(out, days[2:])
  assert len(index_lib.GalleryIndex(out, verify_features=True)) == 304
  expected = {"meta.json", ".append.lock", "ann-0001.faiss", "seg-0001", "feats.npy",
              "areas.npy", "vehicle_id.npy", "camera_id.npy", "file_name.npy"}
  assert {p.name for p in out.iterdir()} == expected
