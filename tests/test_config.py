"""Config: strict keys with their paths, YAML loading, CLI overrides, validate/show commands."""
from __future__ import annotations

import types

import pytest

from megatron import hookimpl
from megatron.cli import main
from megatron.config import ExperimentConfig, load_config
from megatron.errors import ConfigError
from megatron.experiment import validate_experiment_plugins
from megatron.api.learner import LearnerOptions, MetaLearner
from megatron.pluginmanager import get_plugin_manager


def test_defaults_are_the_builtin_experiment():
    cfg = ExperimentConfig()
    assert cfg.data.datasets[0].plugin == "medsynth" and cfg.data.target == "eit"
    assert (cfg.learner.name, cfg.detector.name) == ("reptile", "yolox")


def test_a_typo_names_the_key_path(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("training:\n  meta_epoch: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(f)
    msg = str(err.value)
    assert str(f) in msg and "training.meta_epoch" in msg and "unknown key" in msg


def test_every_error_is_reported_not_just_the_first(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("seed: abc\ntraining:\n  inner_lr: -1\nevaluation:\n  score_treshold: 0.5\n")
    msg = str(pytest.raises(ConfigError, load_config, f).value)
    assert "3 error(s)" in msg
    for path in ("seed", "training.inner_lr", "evaluation.score_treshold"):
        assert f"  {path}:" in msg


def test_cli_overrides_take_precedence_over_yaml(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("training:\n  meta_epochs: 7\n  inner_lr: 0.5\nseed: 3\n")
    cfg = load_config(f, {"training.meta_epochs": 2})  # (a None value would set the key to null: --set KEY=null)
    assert cfg.training.meta_epochs == 2  # CLI wins
    assert cfg.training.inner_lr == 0.5  # YAML kept where the CLI says nothing
    assert cfg.seed == 3


def test_malformed_yaml_names_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("training: [unclosed\n")
    msg = str(pytest.raises(ConfigError, load_config, f).value)
    assert str(f) in msg and "not valid YAML" in msg


def test_yaml_is_read_safely(tmp_path):
    f = tmp_path / "evil.yaml"
    f.write_text("seed: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError):
        load_config(f)


def test_config_is_frozen():
    cfg = ExperimentConfig()
    with pytest.raises(Exception):
        cfg.seed = 4  # type: ignore[misc]


def test_config_show_applies_overrides(capsys, tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("learner:\n  name: maml\n")
    assert main(["config", "show", "-c", str(f), "--set", "training.meta_epochs=9", "--seed", "5"]) == 0
    out = capsys.readouterr().out
    assert "name: maml" in out and "meta_epochs: 9" in out and "seed: 5" in out


def test_config_show_reports_a_bad_override(capsys):
    assert main(["config", "show", "--set", "training.meta_epochz=1"]) == 2
    assert "training.meta_epochz" in capsys.readouterr().err


class _Opts(LearnerOptions):
    first_order: bool = False


class _Learner(MetaLearner):
    PLUGIN_NAME = "learner-under-test"
    Options = _Opts

    def meta_step(self, episodes):  # required of every learner (checked at registration)
        return {}


def test_plugin_options_are_validated_with_their_key_path():
    mod = types.ModuleType("mod")
    mod.megatron_register_learners = hookimpl(lambda: [_Learner])
    pm = get_plugin_manager(autoload=False, extra=[("mod", mod)])
    cfg = ExperimentConfig.model_validate({"learner": {"name": "learner-under-test", "options": {"first_ordre": True}}})
    msg = str(pytest.raises(ConfigError, validate_experiment_plugins, cfg, pm).value)
    assert "learner.options.first_ordre" in msg and "first_order" in msg  # names the valid option


def test_validate_command_reports_unknown_plugin(tmp_path, capsys):
    f = tmp_path / "exp.yaml"
    f.write_text("learner:\n  name: reptil\n")
    assert main(["config", "validate", str(f)]) == 2
    err = capsys.readouterr().err
    assert "learner.name" in err and "reptil" in err and "reptile" in err  # lists the known names


def test_validate_command_accepts_a_valid_file(tmp_path, capsys):
    f = tmp_path / "exp.yaml"
    f.write_text("learner:\n  name: maml\n  options:\n    first_order: true\n")
    assert main(["config", "validate", str(f)]) == 0
    assert "valid" in capsys.readouterr().out
