"""How every tool ends (runtime/cli.py): one error line, the documented exit codes, and
`--help` answering for every `python -m musp_jax.X` that README shows."""

import importlib
import pathlib
import re
import subprocess
import sys

import pytest

from musp_jax.runtime import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
# absl apps define flags at import and cannot share a process (main and demo both
# define --workdir and --config): they answer --help in a process of their own.
ABSL_TOOLS = ("main", "demo", "build_dataset")


def _fail(error):
  def work():
    raise error
  return work


def test_errors_are_one_line_with_the_documented_exit_codes(capsys):
  assert cli.run(lambda: None) == cli.EXIT_OK == 0
  assert cli.run(_fail(FileNotFoundError("/data/x is missing"))) == cli.EXIT_ERROR == 1
  assert capsys.readouterr().err == "error: /data/x is missing\n"
  assert cli.run(_fail(ValueError("bad value")), verbose=True) == 1
  err = capsys.readouterr().err
  assert err.startswith("Traceback (most recent call last)") and err.endswith(
      "error: bad value\n")
  assert cli.run(_fail(FloatingPointError("Loss became nan at step 4"))) == 3
  assert capsys.readouterr().err == "error: Loss became nan at step 4\n"
  assert cli.run(_fail(cli.Stopped("stopped after step 3", exit_code=143))) == 143
  assert capsys.readouterr().err == "stopped after step 3\n"
  assert cli.run(_fail(KeyboardInterrupt())) == 130
  assert capsys.readouterr().err == "Interrupted.\n"
  with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
    cli.run(lambda: 1 / 0)
  with pytest.raises(SystemExit) as e:
    cli.usage_error("give --query and --gallery")
  assert e.value.code == cli.EXIT_USAGE == 2
  assert capsys.readouterr().err == "error: give --query and --gallery\n"


def _readme_tools() -> set[str]:
  text = (ROOT / "README.md").read_text()
  return set(re.findall(r"python -m musp_jax\.(\w+)", text))


def test_readme_names_every_tool_at_the_top_of_the_package():
  tools = {p.stem for p in (ROOT / "musp_jax").glob("*.py")} - {"__init__", "compat"}
  assert _readme_tools() == tools


@pytest.mark.parametrize("tool", sorted(_readme_tools()))
def test_every_tool_answers_help(tool, capsys):
  if tool in ABSL_TOOLS:
    proc = subprocess.run([sys.executable, "-m", f"musp_jax.{tool}", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
  else:
    with pytest.raises(SystemExit) as e:
      importlib.import_module(f"musp_jax.{tool}").main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m musp_jax.{tool}"), out[:200]
  if tool != "visualize":  # visualize: per sub-command (below)
    assert re.search(r"--(\[no\])?verbose", out)  # absl writes --[no]verbose


def test_search_index_and_visualize_commands_answer_help(capsys):
  from musp_jax import search, visualize
  for main, argv, usage in (
      (search.main, ["index", "--help"], "python -m musp_jax.search index"),
      (visualize.main, ["ranks", "--help"], "python -m musp_jax.visualize ranks")):
    with pytest.raises(SystemExit) as e:
      main(argv)
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith(f"usage: {usage}") and "--verbose" in out
