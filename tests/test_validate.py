"""The config check run before training: every bad field named, with what is expected."""

import pytest

from configs import common
from configs import synthetic
from configs import vehicleid
from configs import veri776
from configs import veriwild
from musp_jax.training import validate


def _check(config, **kw):
  kw.setdefault("num_devices", 1)
  kw.setdefault("num_processes", 1)
  validate.check_config(config, **kw)


@pytest.mark.parametrize("module", [common, synthetic, veri776, vehicleid, veriwild])
@pytest.mark.parametrize("arg", [None, "runlocal", "paper,n=3"])
def test_shipped_configs_pass(module, arg):
  for mode in validate.MODES:
    _check(module.get_config(arg), mode=mode)


# (override, the message's text): each problem names the key, the value and what
# is expected.
BAD = [
    ({"eval.distance": "cosin"},
     "eval.distance='cosin': expected one of 'cam_squared', 'cam', 'cosine', 'euclidean'"),
    ({"eval.batch_size": 0}, "eval.batch_size=0: expected an integer >= 1"),
    ({"input.image_size": (64,)},
     "input.image_size=(64,): expected (height, width), two positive integers"),
    ({"input.image_size": (8, 64)},
     "input.image_size=(8, 64): expected each side >= 16 pixels: the backbone reduces "
     "its input 16x (model.last_stride=1, model.layer3_stride=2)"),
    ({"input.image_size": (24, 24), "model.last_stride": 2},
     "expected each side >= 32 pixels"),
    ({"input.image_size": (12, 12), "model.last_stride": 2, "model.layer3_stride": 1},
     "input.image_size=(12, 12): expected each side >= 16 pixels"),
    ({"model.layer3_stride": 3}, "model.layer3_stride=3: expected one of 1, 2"),
    ({"model.attention_init_scale": 0.0},
     "model.attention_init_scale=0.0; expected a number > 0"),
    ({"model.attention_temperature": -1.0},
     "model.attention_temperature=-1.0; expected a number > 0"),
    ({"model.attention_kernel": 2}, "model.attention_kernel=2; expected 3 (official) or 1"),
    ({"input.num_ids": 0}, "input.num_ids=0: expected an integer >= 1"),
    ({"input.num_instances": -2}, "input.num_instances=-2: expected an integer >= 1"),
    ({"keep_checkpoints": 0}, "keep_checkpoints=0: expected an integer >= 1"),
    ({"optim.num_epochs": 0}, "optim.num_epochs=0: expected an integer >= 1"),
    ({"optim.milestones": (6, 2)},
     "optim.milestones=(6, 2): expected increasing positive epochs"),
    ({"optim.wd_exclude": "bias|("}, "optim.wd_exclude='bias|(': expected a regular "
     "expression"),
    ({"optim.lr": float("nan")}, "optim.lr=nan: expected a number > 0"),
    ({"input.erase_area": (0.5, 0.1)}, "input.erase_area=(0.5, 0.1): expected (low, high)"),
    ({"input.flip_prob": 1.5}, "input.flip_prob=1.5: expected a probability in [0, 1]"),
    ({"loss.label_smoothing": 1.0}, "loss.label_smoothing=1.0: expected a number in [0, 1)"),
    ({"eval.every_epochs": 0}, "eval.every_epochs=0: expected an integer >= 1"),
    ({"eval.dataset": "veri"}, "eval.dataset='veri': expected '' (the training dataset)"),
    ({"eval.dataset": "vehicle_id", "eval.test_size": "huge"},
     "eval.test_size='huge': expected one of 'small', 'medium', 'large' (vehicle_id's "
     "test sets)"),
    ({"dataset.builder_config": "giant"},
     "dataset.builder_config='giant': expected one of 'tiny', 'small', 'large', "
     "'parts', 'parts_loose', 'pretrain'"),
    ({"model.head": "musq"}, "model.head='musq'; expected 'musp' or 'baseline'"),
    ({"model.depth": 20}, "model.depth=20: expected one of 18, 34, 50, 101, 152"),
    ({"model.init_from": "/nonexistent/weights"},
     "model.init_from='/nonexistent/weights': expected a folder written by "
     "`python -m musp_jax.import_weights`, or a training workdir, its checkpoints/ "
     "folder or a step folder"),
]


@pytest.mark.parametrize("overrides,text", BAD)
def test_bad_field_is_named_with_what_is_expected(overrides, text):
  config = synthetic.get_config("runlocal")
  for key, value in overrides.items():
    section, field = key.split(".") if "." in key else (None, key)
    (config[section] if section else config)[field] = value
  with pytest.raises(validate.ConfigError) as e:
    _check(config)
  assert text in str(e.value)
  assert "\n" not in str(e.value)


def test_every_problem_is_reported_at_once():
  config = synthetic.get_config("runlocal")
  config.eval.distance = "cosin"
  config.eval.batch_size = 0
  config.keep_checkpoints = 0
  with pytest.raises(validate.ConfigError, match=r"^config, 3 problems: ") as e:
    _check(config)
  for key in ("eval.distance", "eval.batch_size", "keep_checkpoints"):
    assert f"{key}=" in str(e.value)


def test_batches_must_split_evenly_over_devices():
  config = synthetic.get_config("runlocal")  # PK batch 4 x 4 = 16
  config.eval.batch_size = 12
  _check(config, num_devices=4)
  with pytest.raises(validate.ConfigError,
                     match=r"eval.batch_size=12: expected a multiple of the 8 devices"):
    _check(config, num_devices=8)
  config.eval.batch_size = 16
  config.input.num_instances = 3
  with pytest.raises(validate.ConfigError,
                     match=r"input.num_ids \* input.num_instances = 12: expected a "
                     r"multiple of the 8 devices"):
    _check(config, num_devices=8)


def test_eval_mode_checks_only_what_evaluation_reads():
  config = synthetic.get_config("runlocal")
  config.optim.num_epochs = 0  # a training field
  config.keep_checkpoints = 0
  _check(config, mode="eval")
  config.eval.distance = "cosin"
  with pytest.raises(validate.ConfigError, match="eval.distance='cosin'"):
    _check(config, mode="eval")


def test_identities_and_resume_against_the_data():
  config = synthetic.get_config("runlocal")
  validate.check_identities(config, 4)
  with pytest.raises(validate.ConfigError,
                     match=r"input.num_ids=4: expected at most the 3 identities"):
    validate.check_identities(config, 3)
  validate.check_resume(32, total_steps=32, steps_per_epoch=16, config=config, where="w")
  with pytest.raises(validate.ConfigError,
                     match=r"w: checkpoint step 33 is past the end of this config's "
                     r"schedule, 32 steps \(optim.num_epochs=1 x 16 steps per epoch"):
    validate.check_resume(33, total_steps=32, steps_per_epoch=16, config=config,
                          where="w")
