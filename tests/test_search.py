"""End-to-end tests of `python -m musp_jax.search` (embed a gallery, search it)."""

import json
import shutil

import numpy as np
import pytest

import tools_fixtures
from musp_jax import embed
from musp_jax.core import features
from musp_jax.retrieval import saved_features
from musp_jax import search


@pytest.fixture(scope="module")
def loaded():
  return tools_fixtures.shared_model()


@pytest.fixture(scope="module")
def gallery(tmp_path_factory, loaded):
  root = tmp_path_factory.mktemp("search")
  paths = tools_fixtures.write_images(root / "gallery", 6, seed=3)
  out = root / "gallery.npz"
  embed.write_features(loaded, [str(root / "gallery")], str(out), progress=False)
  return root, paths, out


def _cam_squared_reference(qf, qa, gf, ga):
  """sum_p w_p ||f_q^p - f_g^p||^2, w_p = a_q^p a_g^p / sum_j a_q^j a_g^j, by loops."""
  out = np.zeros((len(qf), len(gf)))
  for i in range(len(qf)):
    for j in range(len(gf)):
      w = qa[i] * ga[j]
      w = w / w.sum()
      out[i, j] = sum(w[p] * np.sum((qf[i, p] - gf[j, p]) ** 2) for p in range(len(w)))
  return out


def test_search_gallery_images_find_themselves_first(gallery, tmp_path, capsys):
  root, paths, gallery_npz = gallery
  queries = tmp_path / "queries"
  queries.mkdir()
  for p in (paths[4], paths[1]):
    shutil.copy(p, queries / p.name)
  hits = tmp_path / "hits.json"
  rc = search.main(["--gallery", str(gallery_npz), "--query", str(queries),
                    "--topk", "4", "--json", str(hits)])
  assert rc == 0
  table = capsys.readouterr().out
  assert f"query: {paths[1].name}" in table and "distance" in table
  result = json.loads(hits.read_text())
  assert [q["query"] for q in result["queries"]] == [paths[1].name, paths[4].name]
  g = saved_features.load_features(gallery_npz)
  for q in result["queries"]:
    ranked = q["results"]
    assert len(ranked) == 4
    assert ranked[0]["file_name"] == q["query"]  # itself, at distance ~0
    # The expanded form's residue for identical features, |f|^2 from one GEMM and
    # f . f from another (P C = 3 x 512 terms): sqrt(P C) u x 4 = 1e-5 as a random walk.
    assert abs(ranked[0]["distance"]) < 1e-4
    dists = [r["distance"] for r in ranked]
    assert dists == sorted(dists)
    # Distances agree with an independent computation from the saved features.
    i = list(g.file_names).index(q["query"])
    ref = _cam_squared_reference(g.feats[i:i + 1], g.areas[i:i + 1], g.feats, g.areas)[0]
    for r in ranked:
      # float32 against float64, P C = 1536 terms: sqrt(P C) u x 4 = 1e-5 random walk
      # (the worst case, test_ranking.cam_distance_atol(3, 512), is 3.7e-4);
      # measured 3.1e-7 (AVX2 and AVX).
      assert r["distance"] == pytest.approx(ref[r["gallery_index"]], abs=1e-4)
    assert [r["gallery_index"] for r in ranked] == list(np.argsort(ref, kind="stable")[:4])


def test_json_to_stdout_and_npz_query(gallery, capsys):
  _, _, gallery_npz = gallery
  rc = search.main(["--gallery", str(gallery_npz), "--query", str(gallery_npz),
                    "--topk", "2", "--json", "-"])
  assert rc == 0
  result = json.loads(capsys.readouterr().out)
  assert len(result["queries"]) == 6
  for q in result["queries"]:
    assert q["results"][0]["file_name"] == q["query"]


def _save_with_signature(path, features, **changes):
  sig = json.loads(features.model_signature)
  sig.update(changes)
  saved_features.save_features(path, saved_features.Features(
      features.feats, features.areas, features.ids, features.cams, features.file_names,
      json.dumps(sig, sort_keys=True)))


def test_features_of_another_model_are_refused(gallery, tmp_path, capsys):
  root, paths, gallery_npz = gallery
  g = saved_features.load_features(gallery_npz)
  other = tmp_path / "other.npz"
  _save_with_signature(other, g, weights="0123456789abcdef", num_prototypes=5)
  # Image queries embedded with this workdir's model against a gallery of another.
  with pytest.raises(features.SignatureMismatchError,
                     match=r"(?s)another model.*num_prototypes.*weights"):
    search.query_features([str(paths[0])], saved_features.load_features(other).model_signature,
                          gallery_path=str(other), gallery_source="",
                          workdir=str(tools_fixtures.shared_workdir()), progress=False)
  # A features file as query against it: same check, through the CLI.
  rc = search.main(["--gallery", str(other), "--query", str(gallery_npz)])
  assert rc == 1
  err = capsys.readouterr().err
  assert "another model" in err and "weights" in err
  # Different (P, C) is refused even without signatures.
  baseline_like = saved_features.Features(g.feats[:, -1:], g.areas[:, -1:], g.ids, g.cams)
  with pytest.raises(ValueError, match=r"\(P, C\)"):
    search.search(g, baseline_like)


def test_gallery_without_model_source_needs_a_model(gallery, tmp_path):
  _, paths, gallery_npz = gallery
  bare = tmp_path / "bare.npz"
  saved_features.save_features(bare, saved_features.load_features(gallery_npz))
  g, source = search.load_gallery(str(bare))
  assert source == ""
  with pytest.raises(ValueError, match="pass --workdir or --checkpoint"):
    search.query_features([str(paths[0])], g.model_signature, gallery_path=str(bare),
                          gallery_source="")


def _error(capsys) -> str:
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1 and "Traceback" not in err, err
  return lines[0]


def test_foreign_or_orphaned_galleries_are_one_line_errors(gallery, tmp_path, capsys):
  _, paths, gallery_npz = gallery
  for name, data in (("pickled.npz", b"\x80\x04K\x01."), ("text.npz", b"not numpy")):
    (tmp_path / name).write_bytes(data)
    assert search.main(["--gallery", str(tmp_path / name), "--query", str(paths[0])]) == 1
    assert _error(capsys) == (f"error: {tmp_path / name}: not a readable .npz archive of "
                              "arrays (written by numpy.savez)")
  np.save(tmp_path / "array.npy", np.zeros(3))
  assert search.main(["--gallery", str(tmp_path / "array.npy"), "--query",
                      str(paths[0])]) == 1
  assert _error(capsys) == (f"error: {tmp_path / 'array.npy'}: holds a single .npy array; "
                            "expected an .npz archive (numpy.savez) with named arrays")
  # The model behind a gallery was moved: the gallery and the old place are named.
  workdir = tmp_path / "model"
  shutil.copytree(tools_fixtures.shared_workdir(), workdir)
  moved_npz = tmp_path / "moved.npz"
  assert embed.main(["--workdir", str(workdir), "--images", str(paths[0]),
                     "--out", str(moved_npz)]) == 0
  source = str(np.load(moved_npz)["model_source"])
  shutil.move(workdir, tmp_path / "elsewhere")
  capsys.readouterr()
  assert search.main(["--gallery", str(moved_npz), "--query", str(paths[0])]) == 1
  assert _error(capsys) == (
      f"error: {moved_npz} was made by the model in {source}, which is not there any "
      "more (moved or deleted); pass --workdir or --checkpoint with its new place (the "
      "model is checked against the gallery's signature).")
  assert search.main(["--gallery", str(moved_npz), "--query", str(paths[0]),
                      "--workdir", str(tmp_path / "elsewhere")]) == 0
  # --verbose: the traceback too.
  assert search.main(["--gallery", str(tmp_path / "text.npz"), "--query", str(paths[0]),
                      "--verbose"]) == 1
  err = capsys.readouterr().err
  assert "Traceback (most recent call last)" in err and "error: " in err
