"""Configs: every file loads, variant words do what they say, typos are rejected."""

import importlib
import pathlib

import pytest

from configs import common

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", CONFIGS)
def test_docstring_starts_with_its_command(name):
  module = importlib.import_module(f"configs.{name}")
  first_command = next(line.strip() for line in module.__doc__.splitlines()
                       if line.strip().startswith("python "))
  assert f"--config configs/{name}.py" in first_command


@pytest.mark.parametrize("name", CONFIGS)
def test_config_is_complete_and_runlocal_shrinks_it(name):
  module = importlib.import_module(f"configs.{name}")
  full, local = module.get_config(), module.get_config("runlocal")
  assert full.keys() == common.get_config().keys()
  assert local.model.depth == 18 and local.model.value_channels == 512
  assert local.optim.num_epochs <= full.optim.num_epochs


def test_paper_variant_switches_every_row_of_the_table():
  official, paper = common.get_config(), common.apply_variants(common.get_config(), "paper")
  for field, want in [("value_conv", "full"), ("pooling", "mean"), ("ese", "kept"),
                      ("global_feature", "backbone_gap"), ("diversity", "kept")]:
    assert getattr(paper.model, field) == want != getattr(official.model, field)
  assert (official.eval.distance, paper.eval.distance) == ("cam_squared", "cam")
  assert paper.model.value_channels == 2048 // 4 and official.model.value_channels == 2048


def test_variant_words_combine():
  c = common.apply_variants(common.get_config(), "baseline,n=3,sigmoid,ese_off,bf16,large")
  assert (c.model.head, c.model.num_prototypes, c.model.attention, c.model.ese,
          c.model.dtype, c.dataset.builder_config) == (
              "baseline", 3, "sigmoid", "none", "bfloat16", "large")
  paper3 = common.apply_variants(common.get_config(), "paper,n=3")
  assert paper3.model.value_channels == 1024


@pytest.mark.parametrize("arg", ["basline", "n=1", "paper,rnulocal"])
def test_unknown_or_bad_words_are_rejected(arg):
  with pytest.raises(ValueError, match="n must be|Unknown config variant"):
    common.apply_variants(common.get_config(), arg)
