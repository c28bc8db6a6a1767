"""Configs: every file loads, variant words do what they say, typos are rejected."""

import importlib
import pathlib

import pytest

from configs import common
from configs import synthetic
from configs import veriwild
from musp_jax import models

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
  # The value width follows the backbone: ResNet-18's 512 channels.
  assert models.architecture(local.model)["value_channels"] == 512
  assert models.architecture(full.model)["value_channels"] == (
      512 if full.model.depth == 18 else 2048)
  assert local.model.depth == 18 and local.optim.num_epochs <= full.optim.num_epochs


def test_depth_alone_changes_the_value_width():
  c = common.get_config()
  c.model.depth = 34
  assert models.architecture(c.model)["value_channels"] == 512
  c.model.depth = 101
  assert models.architecture(c.model)["value_channels"] == 2048


def test_paper_variant_switches_every_row_of_the_table():
  official, paper = common.get_config(), common.apply_variants(common.get_config(), "paper")
  for field, want in [("value_conv", "full"), ("pooling", "mean"), ("ese", "kept"),
                      ("global_feature", "backbone_gap"), ("diversity", "kept")]:
    assert getattr(paper.model, field) == want != getattr(official.model, field)
  assert (official.eval.distance, paper.eval.distance) == ("cam_squared", "cam")
  # The paper text's c = 2048 / (n - 1); the official depthwise conv keeps 2048.
  assert models.architecture(paper.model)["value_channels"] == 2048 // 4
  assert models.architecture(official.model)["value_channels"] == 2048


def test_variant_words_combine():
  c = veriwild.get_config("baseline,n=3,sigmoid,ese_off,bf16,large")
  assert (c.model.head, c.model.num_prototypes, c.model.attention, c.model.ese,
          c.model.dtype, c.eval.test_size) == (
              "baseline", 3, "sigmoid", "none", "bfloat16", "large")
  paper3 = common.apply_variants(common.get_config(), "paper,n=3")
  assert models.architecture(paper3.model)["value_channels"] == 1024


def test_dataset_configs_extend_the_word_table():
  tiny = synthetic.get_config("runlocal")
  assert (tiny.dataset.builder_config, tuple(tiny.input.image_size)) == ("tiny", (64, 64))
  assert synthetic.get_config("large").dataset.builder_config == "large"
  with pytest.raises(ValueError, match="Unknown config variant 'large'"):
    common.get_config("large")  # test sizes are words of VehicleID and VERI-Wild only


@pytest.mark.parametrize("arg", ["basline", "n=1", "paper,rnulocal", "n=x"])
def test_unknown_or_bad_words_are_rejected(arg):
  with pytest.raises(ValueError, match="n must be|Unknown config variant"):
    common.apply_variants(common.get_config(), arg)


def test_a_table_entry_with_an_unknown_field_is_refused():
  with pytest.raises(KeyError, match="'model.nmu'"):
    common.apply_variants(common.get_config(), "typo", {"typo": {"model.nmu": 3}})
