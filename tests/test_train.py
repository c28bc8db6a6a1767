"""The training driver end to end on the tiny synthetic dataset.

Runs `python -m musp_jax.main` in subprocesses where the behaviour is about processes
(SIGKILL, Ctrl-C, a second run on the workdir, resume, error lines), and the pure step
in-process for sharding.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tensorboard.util import tensor_util

from configs import synthetic
from musp_jax.training import attention_scores
from musp_jax.training import checkpointing
from musp_jax.data import datasets
from musp_jax.data import training_set
from musp_jax.training import evaluator
from musp_jax.serving import inference
from musp_jax.data import input_pipeline
from musp_jax.retrieval import reference
from musp_jax.core import optim
from musp_jax.runtime import writing
from musp_jax.retrieval import ranking
from musp_jax.core import state as state_lib
from musp_jax.core import step as step_lib
from musp_jax.training import train
from musp_jax.models import build_model
from musp_jax.models import musp

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A run small enough for CI: tiny dataset, ResNet-18 at 64 px, 2 epochs, a checkpoint
# every 2 steps, evaluation at the end of each epoch.
TINY = [
    "--config.input.image_size=(64,64)",
    "--config.input.num_ids=4", "--config.input.num_instances=2",
    "--config.input.num_workers=0",
    "--config.optim.num_epochs=2", "--config.optim.warmup_epochs=1",
    "--config.optim.milestones=(1,)",
    "--config.eval.every_epochs=1", "--config.eval.batch_size=16",
    "--config.checkpoint_every_steps=2", "--config.log_every_steps=2",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tfds")
  datasets.ensure_built("synthetic_vehicles", data_dir=str(path), builder_config="tiny",
                        manual_dir="")
  return path


def _main(workdir, data_dir, *extra, devices=1, wait=True, **popen_kw):
  env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  # One XLA compilation cache for every run here: the same programs compile once.
  cache = pathlib.Path(data_dir).parent / "xla_cache"
  cmd = [sys.executable, "-m", "musp_jax.main", "--config", "configs/synthetic.py:runlocal",
         f"--workdir={workdir}", f"--config.dataset.data_dir={data_dir}",
         f"--config.compilation_cache_dir={cache}", *TINY, *extra]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, **popen_kw)
  if not wait:
    return proc
  out, _ = proc.communicate(timeout=900)
  return proc.returncode, out


def _final_params(workdir):
  manager = checkpointing.make_manager(pathlib.Path(workdir) / "checkpoints", read_only=True)
  step = manager.latest_step()
  restored = manager.restore(step, args=checkpointing.ocp.args.Composite(
      state=checkpointing.ocp.args.StandardRestore()))
  return step, jax.tree.map(np.asarray, restored["state"])


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, data_dir):
  workdir = tmp_path_factory.mktemp("reference")
  code, out = _main(workdir, data_dir)
  assert code == 0, out
  return workdir


def _events(workdir):
  """{tag: [(step, value or image shape)]} of the run's TensorBoard files."""
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(str(workdir), size_guidance={"tensors": 0})
  acc.Reload()
  return {tag: [(e.step, tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)]
          for tag in acc.Tags()["tensors"]}


def test_run_writes_results_and_checkpoints(reference_run, data_dir):
  # 128 training images in batches of 8: 16 steps an epoch, 2 epochs.
  results = json.loads((reference_run / "results.json").read_text())
  assert (results["step"], results["epoch"]) == (32, 2.0)
  # The protocol's row, and the attention scores against the synthetic part masks.
  assert list(results["results"]) == ["synthetic_vehicles", attention_scores.ROW]
  name, row = "synthetic_vehicles", results["results"]["synthetic_vehicles"]
  assert results["results"][attention_scores.ROW]["num_images"] == 22 + 74  # query + gallery
  # Every query of the tiny set has a gallery match under another camera.
  query = datasets.split_index("synthetic_vehicles", "query", data_dir=str(data_dir),
                               builder_config="tiny")
  assert row["num_queries"] == len(query["vehicle_id"])
  assert 0.0 <= row["CMC@1"] <= row["CMC@5"] <= row["CMC@10"] <= 1.0
  assert f"| {name} | {100 * row['mAP']:.2f} |" in (reference_run / "results.md").read_text()
  # Checkpoints: a save every 2 steps, the latest two kept, plus the best evaluation.
  manager = checkpointing.make_manager(reference_run / "checkpoints", read_only=True)
  assert manager.latest_step() == 32 and manager.best_step() in (16, 32)
  assert set(manager.all_steps()) == {30, 32, manager.best_step()}
  restored = checkpointing.load_variables(reference_run / "checkpoints" / "32")
  assert restored.run.num_classes == 16
  # synthetic ids 1..16
  assert restored.run.label_identities == tuple(("synthetic_vehicles", v) for v in range(1, 17))
  assert restored.run.config.model.depth == 18
  assert json.loads((reference_run / "config.json").read_text())["model"]["depth"] == 18
  # TensorBoard: the training loss falls (at lr 1e-4 for 32 steps the triplet term
  # moves most: 3.1 -> 2.4), and each evaluation has its attention grid.
  events = _events(reference_run)
  assert len(events["train/loss"]) == 16
  triplet = [float(v) for _, v in events["train/triplet_loss"]]
  assert np.mean(triplet[-4:]) < 0.9 * np.mean(triplet[:4]), triplet
  assert [step for step, _ in events["attention"]] == [16, 32]


def test_killed_and_interrupted_runs_resume_exactly(tmp_path, data_dir, reference_run):
  """SIGKILL during a save, then Ctrl-C, then a resume: the reference run's numbers.

  1. Killed while a save is in flight: the lock and a temporary folder are left.
  2. The resumed run takes the lock over; a second run on the workdir is refused.
     Ctrl-C, as a terminal sends it to the whole process group (grain's worker
     included), finishes the step, saves it and stops, naming the step.
  3. The run resumed from that step ends with the uninterrupted run's weights.
  """
  workdir = tmp_path / "w"
  proc = _main(workdir, data_dir, wait=False)
  ckpt = workdir / "checkpoints"
  # Kill while a save is in flight (Orbax writes into a temporary folder first) once a
  # finished checkpoint exists to resume from; if saves are too quick to catch, kill
  # after the third finished one.
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    entries = [p.name for p in ckpt.glob("*")] if ckpt.exists() else []
    finished = [e for e in entries if e.isdigit()]
    if finished and (any("tmp" in e for e in entries) or len(finished) >= 3):
      break
    time.sleep(0.002)
  assert proc.poll() is None, "the run ended before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  assert json.loads((workdir / ".lock").read_text())["pid"] == proc.pid  # not released
  killed = proc.pid

  proc = _main(workdir, data_dir, "--config.input.num_workers=1", wait=False,
               start_new_session=True)
  second = _Output(proc)
  resumed = int(second.wait_for(r"Resumed from step (\d+) in ").group(1))
  _wait_for_a_save(workdir, proc, after=resumed)
  code, out = _main(workdir, data_dir)
  assert code == 1
  assert _error_line(out).startswith(
      f"error: {workdir} is in use by another training run (host "
      f"{socket.gethostname()}, pid {proc.pid}, since ")
  os.killpg(proc.pid, signal.SIGINT)
  out = second.finish()
  assert f"Took over the lock of host {socket.gethostname()}, pid {killed}," in out
  assert proc.returncode == 128 + signal.SIGINT, out
  stopped = re.search(r"Stopped by SIGINT after step (\d+): checkpoint \1 is saved in "
                      rf"{ckpt}\. Run the same command again to resume from it\.", out)
  assert stopped, out
  assert "Traceback" not in out and "leaked" not in out
  step = int(stopped.group(1))
  assert checkpointing.finished_steps(ckpt)[-1] == step
  assert (workdir / ".lock").read_text() == ""  # released

  code, out = _main(workdir, data_dir)
  assert code == 0, out
  assert f"Resumed from step {step} in " in out and "Took over" not in out
  step_a, state_a = _final_params(reference_run)
  step_b, state_b = _final_params(workdir)
  assert step_a == step_b
  for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
    np.testing.assert_array_equal(a, b)
  results_a = json.loads((reference_run / "results.json").read_text())
  results_b = json.loads((workdir / "results.json").read_text())
  assert results_a == results_b


class _Output:
  """A subprocess's merged output, read line by line in a thread."""

  def __init__(self, proc):
    self.proc, self.lines = proc, []
    self._thread = threading.Thread(target=self._read, daemon=True)
    self._thread.start()

  def _read(self):
    for line in self.proc.stdout:
      self.lines.append(line)

  def wait_for(self, pattern: str, timeout: float = 600) -> re.Match:
    deadline = time.time() + timeout
    while time.time() < deadline:
      for line in list(self.lines):
        if m := re.search(pattern, line):
          return m
      assert self.proc.poll() is None, "".join(self.lines)
      time.sleep(0.05)
    raise AssertionError(f"no {pattern!r} in:\n{''.join(self.lines)}")

  def finish(self, timeout: float = 300) -> str:
    self.proc.wait(timeout=timeout)
    self._thread.join(timeout=10)
    self.proc.stdout.close()
    return "".join(self.lines)


def _wait_for_a_save(workdir, proc, *, after: int = 0, timeout: float = 600) -> None:
  """Waits until a checkpoint newer than step `after` is complete on disk."""
  deadline = time.time() + timeout
  while max(checkpointing.finished_steps(workdir / "checkpoints"), default=0) <= after:
    assert time.time() < deadline and proc.poll() is None
    time.sleep(0.05)


def _error_line(out: str) -> str:
  """The run's error: its one `error: ` line, with no traceback anywhere."""
  assert "Traceback" not in out, out
  (line,) = [line for line in out.splitlines() if line.startswith("error: ")]
  return line


def test_eval_mode_reproduces_logged_metrics(reference_run, data_dir):
  logged = json.loads((reference_run / "results.json").read_text())
  code, out = _main(reference_run, data_dir, "--mode=eval", f"--step={logged['step']}")
  assert code == 0, out
  again = json.loads((reference_run / f"eval_step_{logged['step']}.json").read_text())
  # Every logged scalar: each protocol row's metrics and the attention scores.
  expected = evaluator.tensorboard_scalars(logged["results"])
  assert any(k.startswith("attention/") for k in expected)
  # The same programs on the same weights and images: measured equal (AVX2 and AVX);
  # abs=1e-6 is below any real change (one swapped rank moves mAP by > 1e-3).
  assert evaluator.tensorboard_scalars(again["results"]) == pytest.approx(expected, abs=1e-6)
  assert evaluator.markdown_table(again) in out  # the table is printed too


@contextlib.contextmanager
def _read_only(path):
  """`path` unwritable for this user (chmod), or for root too (the immutable flag)."""
  path = pathlib.Path(path)
  mode = path.stat().st_mode
  path.chmod(0o555)
  immutable = False
  if writing.check_writable(path) is None:  # root ignores the mode bits
    immutable = subprocess.run(["chattr", "+i", str(path)], capture_output=True,
                               check=False).returncode == 0
  try:
    if writing.check_writable(path) is None:
      pytest.skip("cannot make a folder read-only here")
    yield
  finally:
    if immutable:
      subprocess.run(["chattr", "-i", str(path)], check=True)
    path.chmod(mode)


def test_eval_mode_on_a_read_only_workdir_prints_the_table(reference_run, data_dir):
  before = sorted(p.name for p in reference_run.iterdir())
  with _read_only(reference_run):
    code, out = _main(reference_run, data_dir, "--mode=eval")
  assert code == 0, out
  reason = re.search(rf"Cannot write the results to {reference_run} \((.+)\): they will "
                     "only be printed.", out)
  assert reason, out
  assert out.index(reason.group(0)) < out.index("query:")  # before any feature
  logged = json.loads((reference_run / "results.json").read_text())
  assert evaluator.markdown_table(logged).split("\n", 1)[1] in out  # same figures
  assert f"Not written: {reference_run} is not writable ({reason.group(1)})." in out
  assert sorted(p.name for p in reference_run.iterdir()) == before


def test_eval_on_another_dataset_needs_only_that_dataset(reference_run, tmp_path):
  """Cross-domain: the checkpoint describes itself, so the training data is not read.

  The evaluation data_dir holds only a tiny VeRi-776 build; the figures must equal
  those of the tools' single-device path (inference.embed_files + reference.rank_metrics).
  """
  import test_tfds_veri776
  expected = test_tfds_veri776.write_veri(tmp_path / "VeRi")
  other = tmp_path / "tfds"
  datasets.build("veri776", data_dir=str(other), builder_config="",
                 manual_dir=str(tmp_path / "VeRi"))
  code, out = _main(reference_run, other, "--mode=eval", "--config.eval.dataset=veri776")
  assert code == 0, out
  got = json.loads((reference_run / "eval_step_32.json").read_text())["results"]["veri776"]
  loaded = inference.load_model(reference_run)
  feats = {}
  for folder in ("image_query", "image_test"):
    names = sorted(n for n in expected if n.startswith(folder))
    files = [(n, str(tmp_path / "VeRi" / n)) for n in names]
    feats[folder] = (inference.embed_files(loaded, files, progress=False),
                     np.array([expected[n][1] for n in names]),
                     np.array([expected[n][2] for n in names]))
  (q, q_ids, q_cams), (g, g_ids, g_cams) = feats["image_query"], feats["image_test"]
  distmat = np.asarray(ranking.pairwise_distance(q.feats, q.areas, g.feats, g.areas))
  want = reference.rank_metrics(distmat, q_ids, g_ids, q_cams, g_cams)
  assert got["num_queries"] == want["num_valid_queries"] == 2
  # The same ranking (2 queries, no near-ties), metrics in float64 from integer ranks.
  assert got["mAP"] == pytest.approx(want["mAP"], rel=1e-12)
  assert got["mINP"] == pytest.approx(want["mINP"], rel=1e-12)
  assert got["CMC@1"] == pytest.approx(want["cmc"][0], rel=1e-12)


def test_mismatched_checkpoint_is_refused(reference_run, data_dir):
  code, out = _main(reference_run, data_dir, "--mode=eval", "--config.model.num_prototypes=3")
  assert code != 0
  assert "model.num_prototypes: checkpoint has 5, config asks 3" in out


def test_unknown_config_key_is_rejected(tmp_path, data_dir):
  code, out = _main(tmp_path, data_dir, "--config.model.nmu=3")
  assert code == 2
  assert _error_line(out).startswith(
      "error: --config.model.nmu=3: unknown config key; model has no field 'nmu' (its "
      "fields are attention, attention_init_scale, attention_kernel, "
      "attention_temperature, backbone, conv_impl, depth,")


def test_bad_config_is_refused_before_anything_runs(tmp_path, data_dir):
  workdir = tmp_path / "w"
  code, out = _main(workdir, data_dir, "--config.eval.distance=cosin",
                    "--config.eval.batch_size=0", "--config.input.num_ids=-1",
                    "--config.keep_checkpoints=0", "--config.optim.num_epochs=0")
  assert code == 1
  assert _error_line(out) == (
      "error: config, 5 problems: input.num_ids=-1: expected an integer >= 1; "
      "eval.batch_size=0: expected an integer >= 1; eval.distance='cosin': expected one "
      "of 'cam_squared', 'cam', 'cosine', 'euclidean'; optim.num_epochs=0: expected an "
      "integer >= 1; keep_checkpoints=0: expected an integer >= 1.")
  assert not workdir.exists()  # nothing was read, built or written
  code, out = _main(workdir, data_dir, "--step=4")
  assert code == 2
  assert _error_line(out) == (
      f"error: --step=4 is only for --mode=eval; training always resumes from the "
      f"latest checkpoint of --workdir {workdir}.")


def test_rerun_past_the_end_of_its_schedule_is_refused(reference_run, data_dir):
  """A smaller dataset or another batch would make the saved step past the last one."""
  before = {p.name: p.stat().st_mtime_ns for p in reference_run.iterdir()}
  config = (reference_run / "config.json").read_text()
  code, out = _main(reference_run, data_dir, "--config.optim.num_epochs=1")
  assert code == 1
  assert _error_line(out) == (
      f"error: {reference_run}/checkpoints: checkpoint step 32 is past the end of this "
      "config's schedule, 16 steps (optim.num_epochs=1 x 16 steps per epoch at "
      "input.num_ids * input.num_instances = 8); it was trained with another dataset "
      "size or batch. Train in a new --workdir, or use the config it was trained with.")
  # Refused after restore: config.json still describes the checkpoints, nothing new.
  assert (reference_run / "config.json").read_text() == config
  after = {p.name: p.stat().st_mtime_ns for p in reference_run.iterdir()}
  assert after.keys() == before.keys()
  assert {k: v for k, v in after.items() if k != ".lock"} == {
      k: v for k, v in before.items() if k != ".lock"}


def test_missing_dataset_names_the_build_command(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(
      [sys.executable, "-m", "musp_jax.main", "--config", "configs/veri776.py:runlocal",
       f"--workdir={tmp_path / 'w'}", f"--config.dataset.data_dir={tmp_path / 'empty'}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1
  assert _error_line(out.stderr) == (
      f"error: Dataset veri776 is not built in {tmp_path / 'empty'}; build it with: "
      f"python -m musp_jax.build_dataset veri776 --manual_dir DIR --data_dir "
      f"{tmp_path / 'empty'} (DIR: the folder of the manual download)")


def test_nan_loss_stops_with_step_and_checkpoint_named(tmp_path, data_dir):
  code, out = _main(tmp_path, data_dir, "--config.optim.lr=1e30",
                    "--config.optim.warmup_epochs=0", "--config.loss.triplet_weight=0.0")
  assert code == 3  # a non-finite loss (runtime/cli.py)
  # lr 1e30: the first update blows the weights up, the second step's loss is not finite.
  assert re.fullmatch(
      r"error: Loss became (nan|inf) at step 2; training stopped \(no good checkpoint was "
      r"saved\)\. Lower optim.lr, enable optim.grad_clip, or check the input data\.",
      _error_line(out)), out


def test_corrupt_latest_step_and_a_diverging_resume_leave_a_resumable_workdir(
    tmp_path, data_dir, reference_run):
  """The reference run with step 32's largest array file cut in half:

  1. Resuming names the cut file in one line (no traceback, no asyncio noise), moves
     32 aside and restores 30. With lr 1e30, keep 1 and a save every step it saves 31,
     whose weights give a non-finite loss: the run stops naming 30 as the last good
     step and moves 31 to diverged_checkpoints/; 30, the step it resumed from, is
     still there although keep=1.
  2. The plain command resumes from 30 and ends where the uninterrupted run ended.
  """
  workdir = tmp_path / "w"
  shutil.copytree(reference_run, workdir)
  ckpt = workdir / "checkpoints"
  cut = max((f for f in (ckpt / "32" / "state").rglob("*") if f.parent.name == "d"),
            key=lambda f: f.stat().st_size)
  cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
  code, out = _main(workdir, data_dir, "--config.optim.lr=1e30",
                    "--config.keep_checkpoints=1", "--config.checkpoint_every_steps=1")
  assert code == 3, out  # a non-finite loss (runtime/cli.py)
  (warning,) = [line for line in out.splitlines() if "is corrupt" in line]
  assert f"Checkpoint step 32 in {ckpt} is corrupt: {cut} is cut short (" in warning
  assert f"moved it to {workdir / 'corrupt_checkpoints' / '32'}." in warning
  assert "Event loop is closed" not in out and "never retrieved" not in out
  assert f"Resumed from step 30 in {ckpt}." in out
  assert re.fullmatch(
      rf"error: Loss became (nan|inf) at step 32; training stopped \(the last good "
      rf"checkpoint is step 30 in {re.escape(str(ckpt))}; checkpoint 31, whose weights "
      rf"gave this loss, is moved to {re.escape(str(workdir / 'diverged_checkpoints'))}"
      r"/31\)\. Lower optim.lr, enable optim.grad_clip, or check the input data\.",
      _error_line(out)), out
  assert checkpointing.finished_steps(ckpt)[-1] == 30

  code, out = _main(workdir, data_dir)
  assert code == 0, out
  assert f"Resumed from step 30 in {ckpt}." in out
  step_a, state_a = _final_params(reference_run)
  step_b, state_b = _final_params(workdir)
  assert step_a == step_b == 32
  for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
    np.testing.assert_array_equal(a, b)
  assert (json.loads((reference_run / "results.json").read_text())
          == json.loads((workdir / "results.json").read_text()))


def test_nan_message_names_a_finished_checkpoint_before_the_bad_weights(tmp_path):
  """Saves in flight are waited for; the checkpoint of the diverged weights is moved
  out of checkpoints/, so that the next run cannot resume from it."""
  manager = checkpointing.make_manager(tmp_path / "checkpoints", keep=5)
  state = {"w": jnp.ones((256, 256))}
  run = checkpointing.RunInfo(synthetic.get_config(), 16)
  guard = train._FiniteLossGuard(manager)
  checkpointing.save(manager, 2, state, next_step=2, run=run)  # asynchronous
  guard.push(2, {"loss": jnp.float32(1.0)})
  guard.push(3, {"loss": jnp.float32(1.0)})
  checkpointing.save(manager, 4, state, next_step=4, run=run)
  guard.push(4, {"loss": jnp.float32(jnp.nan)})  # step 5 ran from checkpoint 4's weights
  with pytest.raises(train.NonFiniteLossError) as e:
    guard.flush()
  diverged = tmp_path / "diverged_checkpoints" / "4"
  assert str(e.value) == (
      f"Loss became nan at step 5; training stopped (the last good checkpoint is step 2 "
      f"in {tmp_path / 'checkpoints'}; checkpoint 4, whose weights gave this loss, is "
      f"moved to {diverged}). Lower optim.lr, enable optim.grad_clip, or check the "
      "input data.")
  assert checkpointing.finished_steps(tmp_path / "checkpoints") == [2]
  assert (diverged / "state").is_dir() and manager.latest_step() == 2


def test_resumed_from_step_is_kept_until_a_newer_one_is_trusted(tmp_path):
  """keep=1: a newer save would delete the step a run resumed from; it stays until a
  newer step's weights gave finite losses for trust_steps steps."""
  directory = tmp_path / "checkpoints"
  run = checkpointing.RunInfo(synthetic.get_config(), 16)
  state = {"w": jnp.ones((4, 4))}
  finite, nan = {"loss": jnp.float32(1.0)}, {"loss": jnp.float32(jnp.nan)}

  def resumed_from_2():
    for path in (directory, tmp_path / "diverged_checkpoints"):
      shutil.rmtree(path, ignore_errors=True)
    protected = checkpointing.ProtectedSteps()
    manager = checkpointing.make_manager(directory, keep=1, protected=protected)
    checkpointing.save(manager, 2, state, next_step=2, run=run)
    manager.wait_until_finished()
    protected.steps.add(2)  # as train.py does after restoring it
    guard = train._FiniteLossGuard(manager, protected=protected, trust_steps=2)
    guard.push(2, finite)  # checkpoint 2's weights gave a finite loss
    guard.flush()  # before the save of 3
    checkpointing.save(manager, 3, state, next_step=3, run=run)
    guard.saved(3)
    manager.wait_until_finished()
    assert checkpointing.finished_steps(directory) == [2, 3]  # 2 is protected
    return manager, guard

  # Diverging at once: checkpoint 3's weights give NaN; 3 is set aside, 2 is left.
  manager, guard = resumed_from_2()
  guard.push(3, nan)
  with pytest.raises(train.NonFiniteLossError, match="the last good checkpoint is step 2"):
    guard.flush()
  assert checkpointing.finished_steps(directory) == [2]
  assert (tmp_path / "diverged_checkpoints" / "3").is_dir()

  # Finite for one step after 3 (trust_steps=2 asks two): 2 is still protected.
  manager, guard = resumed_from_2()
  guard.push(3, finite)
  guard.push(4, finite)  # checks step 3's loss
  checkpointing.save(manager, 4, state, next_step=4, run=run)
  manager.wait_until_finished()
  assert checkpointing.finished_steps(directory) == [2, 4]
  # The loss of step 4 is finite too: 3 was trusted (and is gone with keep=1), 2 is
  # released, and the next save leaves only itself.
  guard.flush()
  checkpointing.save(manager, 5, state, next_step=5, run=run)
  manager.wait_until_finished()
  assert checkpointing.finished_steps(directory) == [5]


def test_sharded_step_equals_single_device_step(data_dir):
  """Along 3 steps of a real run, the step on 8 fake devices equals the 1-device step.

  Each step is taken from the same state on both meshes; the losses, the gradient norm,
  the new batch statistics and the size of the parameter update must agree. (Two
  free-running trajectories drift apart: they differ in float32 reduction order, and
  Adam's first update is lr * sign(g), so near-zero gradient elements whose sign flips
  move by 2 lr; measured 1e-5 relative loss drift at step 2 growing to 4e-3 at step 5.)

  The backbone runs in float64 (the head keeps its float32 pooling and BNNeck). In
  float32 the two compilations round differently by ~1e-7, enough to break near-ties
  in the backward pass (ReLU at 0, the stem's max-pool): the gradient took another
  branch and its norm moved by 1.06e-3 on an AVX2 CPU. In float64 the rounding
  differences are ~1e-16 and no such choice flips (measured 1.8e-8 there); a sharding
  bug (statistics or gradients not reduced over the devices) moves these figures by far
  more than the bounds below.
  """
  config = synthetic.get_config()
  config.dataset.builder_config = "tiny"
  config.input.num_workers = 0
  config.input.image_size = (64, 64)
  config.input.num_ids, config.input.num_instances = 4, 2
  config.dataset.data_dir = str(data_dir)
  data = training_set.load(config)
  model = build_model(config.model, data.num_classes)
  tx = optim.make_optimizer(config.optim, 10)
  batches = list(_take(input_pipeline.train_batches(
      data.source, data.labels, config.input, seed=0, start_step=0, global_batch_size=8),
      3))
  with jax.enable_x64(True):
    model = musp.ReIDModel(backbone=model.backbone.clone(dtype=jnp.float64),
                           head=model.head.clone(dtype=jnp.float64))
    steps, shardings = {}, {}
    for n in (1, 8):
      mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                           devices=jax.devices()[:n])
      state, shardings[n] = state_lib.create_train_state(model, tx, (64, 64), seed=0,
                                                         mesh=mesh)
      # Not donated: each step starts from the same state on both meshes.
      steps[n] = jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx,
                                           loss_config=config.loss,
                                           input_config=config.input),
                         in_shardings=(shardings[n], NamedSharding(mesh, P("data"))))
    state = jax.device_put(jax.tree.map(
        lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x,
        state), shardings[1])
    for batch in batches:
      batch = jax.tree.map(jnp.asarray, batch)
      new = {n: steps[n](jax.device_put(state, shardings[n]), batch) for n in (1, 8)}
      (s1, m1), (s8, m8) = jax.device_get(new[1]), jax.device_get(new[8])
      # The loss's head terms are float32: 16 float32 ulps. Measured 1.2e-7 (AVX2 and
      # AVX).
      np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=2e-6)
      # What stays float32 in the gradient (the head; kernel gradients accumulated in
      # float32 over up to K = 8 images x 32 x 32 pixels = 8192 terms) rounds as a
      # random walk, sqrt(K) u = 5.4e-6: 1e-5. Measured 1.9e-7 (AVX2), 1.7e-7 (AVX).
      np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-5)
      # The backbone's statistics are float64 (measured 2e-11 relative); the BNNeck's
      # stay float32 (mean and variance of 8 values over the devices): the largest
      # difference measured is 5e-4 of this bound (AVX2 and AVX).
      for a, b in zip(jax.tree.leaves(s8.batch_stats), jax.tree.leaves(s1.batch_stats)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
      old = jax.device_get(state.params)
      update = lambda s: np.sqrt(sum(np.sum((np.asarray(x) - y) ** 2) for x, y in zip(
          jax.tree.leaves(s.params), jax.tree.leaves(old))))
      # Adam moves ~11M parameters by ~lr = 1e-4 each (warmup): an update norm ~0.3.
      assert update(s1) > 0.03
      # An element-wise function of the gradient and moments: no more error than the
      # gradient's. Measured 1.2e-8 (AVX2 and AVX).
      np.testing.assert_allclose(update(s8), update(s1), rtol=1e-5)
      state = new[1][0]


def _take(iterator, n):
  for _ in range(n):
    yield next(iterator)
