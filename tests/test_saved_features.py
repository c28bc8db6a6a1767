"""The saved-features format: bad files fail naming the file and the key."""

import numpy as np
import pytest

from musp_jax.retrieval import saved_features


def _write(path, **arrays):
  np.savez(path, **arrays)
  return path


@pytest.mark.parametrize("arrays, message", [
    (dict(feats=np.zeros((3, 4), np.int32), pids=[1, 2, 3], camids=[0, 0, 0]),
     r"key 'feats' has dtype int32; expected float"),
    (dict(feats=np.zeros((3, 4)), pids=[1.0, 2.0, 3.0], camids=[0, 0, 0]),
     r"key 'pids' has dtype float64; expected integer ids"),
    (dict(feats=np.zeros((3, 4)), pids=[1, 2], camids=[0, 0, 0]),
     r"key 'pids' has shape \(2,\); expected \(3,\)"),
    (dict(feats=np.zeros((3, 4)), pids=[1, 2, 3], camids=np.zeros((3, 1), int)),
     r"key 'camids' has shape \(3, 1\); expected \(3,\)"),
    (dict(feats=np.zeros((3, 2, 4, 1)), pids=[1, 2, 3], camids=[0, 0, 0]),
     r"key 'feats' has shape \(3, 2, 4, 1\); expected \(N, D\) or \(N, P, C\)"),
    (dict(feats=np.array([[0.0, np.nan]]), pids=[1], camids=[0]),
     r"key 'feats' has NaN or infinite values \(row 0\)"),
    (dict(feats=np.zeros((2, 3, 4)), areas=np.ones((2, 2)), pids=[1, 2], camids=[0, 0]),
     r"key 'areas' has shape \(2, 2\); expected \(2, 3\)"),
    (dict(feats=np.zeros((2, 2, 4)), areas=[[1.0, 1.0], [0.0, 0.0]], pids=[1, 2],
          camids=[0, 0]), r"key 'areas' row 1 is \[0. 0.\]"),
    (dict(feats=np.zeros((2, 4)), ids=[1, 2]),
     r"missing keys \['pids', 'camids'\] \(found \['feats', 'ids'\]\)"),
    (dict(feats=np.zeros((2, 1, 4)), areas=np.ones((2, 1)), vehicle_id=[1, 2]),
     r"missing keys \['camera_id'\]"),
    (dict(feats=np.zeros((2, 4)), pids=np.array([1, "a"], dtype=object), camids=[0, 0]),
     r"key 'pids' holds Python objects"),
])
def test_bad_features_files_name_file_and_key(tmp_path, arrays, message):
  path = _write(tmp_path / "bad.npz", **arrays)
  with pytest.raises(ValueError, match=f"^{str(path)}: {message}"):
    saved_features.load_features(path)


def test_unreadable_features_files(tmp_path):
  text = tmp_path / "feats.txt"
  text.write_text("not numpy\n")
  with pytest.raises(ValueError, match="not a readable .npz archive") as e:
    saved_features.load_features(text)
  assert "pickle" not in str(e.value) and str(text) in str(e.value)
  np.save(tmp_path / "one.npy", np.zeros((2, 3)))
  with pytest.raises(ValueError, match="single .npy array"):
    saved_features.load_features(tmp_path / "one.npy")
  with pytest.raises(FileNotFoundError, match="absent.npz"):
    saved_features.load_features(tmp_path / "absent.npz")
