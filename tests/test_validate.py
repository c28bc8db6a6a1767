"""The config check run before training: every bad field named, with what is expected."""

import pytest

from configs import common
from configs import joint
from configs import own
from configs import synthetic
from configs import vehicleid
from configs import veri776
from configs import veriwild
from musp_jax.training import validate


def _check(config, **kw):
  kw.setdefault("num_devices", 1)
  kw.setdefault("num_processes", 1)
  validate.check_config(config, **kw)


@pytest.mark.parametrize("module", [common, synthetic, veri776, vehicleid, veriwild, joint])
@pytest.mark.parametrize("arg", [None, "runlocal", "paper,n=3", "ibn_a"])
def test_shipped_configs_pass(module, arg):
  for mode in validate.MODES:
    _check(module.get_config(arg), mode=mode)


def test_own_data_config_needs_the_datasets_name():
  with pytest.raises(validate.ConfigError, match=r"dataset.name='': expected a dataset"):
    _check(own.get_config())
  config = own.get_config()
  config.dataset.name = "my_city"  # not built in data_dir: named with the build command
  with pytest.raises(validate.ConfigError,
                     match=r"dataset.name='my_city': expected datasets among .*"
                           r"build_dataset folder --manual_dir DIR --name NAME`; none is "
                           r"built in "):
    _check(config)
  # Evaluation checks no training dataset's build (a checkpoint's may live elsewhere);
  # reading an unbuilt one names its build command (test_tfds_folder).
  _check(config, mode="eval")


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
    ({"model.padding": "reflect"}, "model.padding='reflect': expected one of 'zeros', 'circular'"),
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
    ({"eval.dataset": "veri"}, "eval.dataset='veri': expected '' (the training datasets) "
     "or datasets among 'veri776', 'vehicle_id', 'veri_wild', 'synthetic_vehicles' or of "
     "your own images (`python -m musp_jax.build_dataset folder --manual_dir DIR --name "
     "NAME`; none is built in ~/tensorflow_datasets); 'veri' is neither"),
    ({"dataset.name": "veri776,veri776"},
     "dataset.name='veri776,veri776': expected each dataset once ('veri776' is listed 2 "
     "times)"),
    ({"dataset.name": ""}, "dataset.name='': expected a dataset, or several "
     "comma-separated, e.g. 'veri776,vehicle_id'"),
    ({"dataset.name": "folder"}, "'folder' is neither"),
    ({"dataset.name": "veri776,synthetic_vehicles", "dataset.combine_all": True},
     "eval.dataset='': expected datasets not trained on: dataset.combine_all=True trains "
     "on the test identities of synthetic_vehicles, veri776, whose protocols would rank "
     "vehicles the model has learnt"),
    ({"dataset.combine_all": True, "eval.dataset": "veri776,synthetic_vehicles"},
     "eval.dataset='veri776,synthetic_vehicles': expected datasets not trained on"),
    ({"model.backbone": "resnet_ibn_b"},
     "model.backbone='resnet_ibn_b': expected one of 'resnet', 'resnet_ibn_a'"),
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
  config = synthetic.get_config("runlocal")  # P = 4
  validate.check_identities(config, {"synthetic_vehicles": 4})
  with pytest.raises(validate.ConfigError,
                     match=r"input.num_ids=4: expected at most the 3 identities of the "
                           r"training data \(a 1, b 2\)"):
    validate.check_identities(config, {"a": 1, "b": 2})
  # Dataset-balanced batches: 4 identities from 3 datasets are 2 + 1 + 1.
  validate.check_identities(config, {"a": 1, "b": 9, "c": 9})
  config.input.balance_datasets = True
  validate.check_identities(config, {"a": 2, "b": 1, "c": 1})
  with pytest.raises(validate.ConfigError,
                     match=r"input.num_ids=4 with input.balance_datasets takes 2 "
                           r"identities from a per batch; it has 1 \(a 1, b 9, c 9\)"):
    validate.check_identities(config, {"a": 1, "b": 9, "c": 9})
  with pytest.raises(validate.ConfigError,
                     match=r"input.num_ids=4 identities per batch cannot take one from "
                           r"each of the 5 datasets"):
    validate.check_identities(config, dict.fromkeys("abcde", 9))
  validate.check_resume(32, total_steps=32, steps_per_epoch=16, config=config, where="w")
  with pytest.raises(validate.ConfigError,
                     match=r"w: checkpoint step 33 is past the end of this config's "
                     r"schedule, 32 steps \(optim.num_epochs=1 x 16 steps per epoch"):
    validate.check_resume(33, total_steps=32, steps_per_epoch=16, config=config,
                          where="w")


def test_rerank_memory_is_checked_for_each_evaluation_dataset(monkeypatch):
  """Each built evaluation set must fit when re-ranked; with several, the message says
  which. A 1 MiB machine (sysconf patched) cannot hold the tiny synthetic set's."""
  import tools_fixtures
  config = tools_fixtures.tiny_config()
  config.dataset.data_dir = tools_fixtures.shared_data_dir()
  config.eval.rerank = True
  _check(config, mode="eval")  # this machine holds it
  pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 256}
  monkeypatch.setattr(validate.os, "sysconf", pages.__getitem__)
  with pytest.raises(validate.ConfigError,
                     match=r"eval.rerank=True: k-reciprocal re-ranking of 22 queries and "
                           r"74 gallery images needs about .* and this machine has 0.0 GiB"):
    _check(config, mode="eval")
  config.eval.dataset = "synthetic_vehicles,veri776"  # veri776 is not built there
  with pytest.raises(validate.ConfigError,
                     match=r"74 gallery images of synthetic_vehicles needs about"):
    _check(config, mode="eval")
