"""scripts/gpu_check.sh --dry-run: every part of the GPU check runs on a CPU, with the
I/O stack (TensorFlow, tfds, grain, clu) refused, as on a bare GPU image."""

import json
import subprocess
import sys

import pytest

import io_stack


def test_dry_run_writes_every_figure(tmp_path):
  out = tmp_path / "out"
  env = io_stack.blocked_env(tmp_path, OUT=str(out), PYTHON=sys.executable)
  proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], env=env,
                        cwd=io_stack.ROOT, capture_output=True, text=True, timeout=900,
                        check=False)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
  summary = json.loads((out / "summary.json").read_text())
  assert summary["dry_run"] is True
  assert {p: s["status"] for p, s in summary["status"].items()} == {
      "platform": "ok", "parity": "ok", "train": "ok", "eval": "ok"}
  # conv_impl "auto" is the GEMM form on a CPU (XLA/cuDNN on a GPU).
  assert summary["platform"]["conv_impl_auto"] == "gemm"
  assert summary["platform"]["conv_impl_ok"] is True
  # Parity: the "device" is the CPU here, so the two runs agree to the last bit.
  for dtype in ("float32", "bfloat16"):
    assert summary["parity"][dtype]["max_abs_feature_diff"] == 0.0
    assert summary["parity"][dtype]["ok"] is True
  contenders = summary["train"]["contenders"]
  assert set(contenders) == {"jax:auto", "torch:eager_cl"}
  for row in contenders.values():
    assert row["img_s"] > 0
    # The same Python-float ratio, as rounded into the summary (approx's default rel).
    assert row["vs_torch_eager"] == pytest.approx(
        row["img_s"] / contenders["torch:eager_cl"]["img_s"])
  ev = summary["eval"]
  assert (ev["queries"], ev["gallery"], ev["parts"]) == (200, 1500, 5)
  assert ev["evaluate_s"] > 0 and ev["gemm_share"] > 0
  assert sorted(p.name for p in out.iterdir()) == [
      "eval.log", "parity.log", "platform.log", "summary.json", "summary.md", "train.log"]
  assert "Goals:" in (out / "summary.md").read_text()
