"""scripts/scaling.py: efficiency arithmetic, and a tiny end-to-end run on 2 fake devices."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import tools_fixtures

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_efficiency_is_throughput_over_linear():
  rows = [{"mode": "weak", "devices": 1, "img_s": 100.0},
          {"mode": "weak", "devices": 4, "img_s": 360.0},
          {"mode": "strong", "devices": 1, "img_s": 80.0},
          {"mode": "strong", "devices": 2, "img_s": 80.0},
          {"mode": "other", "devices": 2, "img_s": 50.0}]
  out = tools_fixtures.load_script("scaling").add_efficiency(rows)
  # Ratios of Python floats: approx's default rel=1e-6 is far above their rounding.
  assert [r["efficiency"] for r in out[:4]] == pytest.approx([1.0, 0.9, 1.0, 0.5])
  assert np.isnan(out[4]["efficiency"])  # No 1-device baseline to compare with.


def test_tiny_run_writes_table_and_plot(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": "",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "PYTHONPATH": str(ROOT)}
  subprocess.run(
      [sys.executable, str(ROOT / "scripts" / "scaling.py"), "--devices", "1,2",
       "--modes", "weak", "--per_device_batch", "4", "--image_size", "32", "--depth", "18",
       "--head", "baseline", "--num_classes", "4", "--reps", "1", "--steps", "1",
       "--out_dir", str(tmp_path)], env=env, check=True, timeout=600, capture_output=True)
  table = (tmp_path / "scaling.md").read_text()
  rows = [line for line in table.splitlines() if line.startswith("| weak |")]
  assert [row.split("|")[2].strip() for row in rows] == ["1", "2"]
  assert [row.split("|")[3].strip() for row in rows] == ["4", "8"]  # weak: batch grows
  assert rows[0].rstrip().endswith("| 100% |")  # n=1 is its own baseline
  assert (tmp_path / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
