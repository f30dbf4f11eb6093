"""The plugin core: loading, registers, failure reporting, entry points, environment switches."""
from __future__ import annotations

import importlib.metadata as md
import json
import sys
import types
from pathlib import Path

import pytest

import megatron
from megatron import hookimpl
from megatron.cli import main
from megatron.errors import DuplicateNameError, PluginError, UnknownNameError
from megatron.pluginmanager import BUILTIN_PLUGINS, get_plugin_manager
from megatron.api.similarity import SimilarityMetric

EXAMPLE_SRC = Path(__file__).resolve().parent.parent / "examples" / "megatron-ks-similarity" / "src"


def metric_class(name: str, module: str) -> type:
    return type("Metric_" + name.replace("-", "_"), (SimilarityMetric,),
                {"PLUGIN_NAME": name, "__module__": module, "summarize": lambda self, task: len(task),
                 "distance": lambda self, a, b: float(abs(a - b))})


def plugin_module(modname: str, *classes: type) -> types.ModuleType:
    mod = types.ModuleType(modname)

    @hookimpl
    def megatron_register_similarity_metrics():
        return list(classes)

    mod.megatron_register_similarity_metrics = megatron_register_similarity_metrics
    return mod


class FakeDist:
    """A stand-in for an installed distribution, the way pluggy's own tests fake one."""

    def __init__(self, name: str, version: str, entry_points: list[md.EntryPoint]):
        self.metadata = {"name": name}
        self.version = version
        self.entry_points = entry_points


@pytest.fixture
def fake_installed(monkeypatch):
    """Install fake distributions: ``fake_installed(FakeDist(...), ...)``."""

    def install(*dists: FakeDist) -> None:
        monkeypatch.setattr(md, "distributions", lambda: list(dists))

    monkeypatch.delenv("MEGATRON_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.syspath_prepend(str(EXAMPLE_SRC))
    return install


def ks_dist() -> FakeDist:
    ep = md.EntryPoint("ks_similarity", "megatron_ks_similarity.plugin", "megatron")
    return FakeDist("megatron-ks-similarity", "1.0.0", [ep])


def test_every_builtin_plugin_loads_without_failure():
    pm = get_plugin_manager(autoload=False)
    assert pm.failures == []
    assert {name.rsplit(".", 1)[-1] for name in BUILTIN_PLUGINS} <= set(pm.info)
    assert all(pm.info[n].builtin and pm.info[n].package == "megatron" for n in pm.info)


def test_builtins_are_registered_like_third_party_plugins():
    # same call, same bookkeeping: a built-in is only marked builtin, nothing else differs
    pm = get_plugin_manager(builtins=False, autoload=False, extra=[("mine", plugin_module("mine", metric_class("m", "mine")))])
    assert pm.registers["similarity"].names() == ["m"]
    assert pm.registers["similarity"].owner("m") == "mine"


def test_hookimpl_is_reexported_from_package_root():
    assert megatron.hookimpl.project_name == "megatron"


def test_each_call_gives_a_fresh_manager():
    a = get_plugin_manager(builtins=False, autoload=False)
    b = get_plugin_manager(builtins=False, autoload=False)
    a.register_plugin(plugin_module("x", metric_class("x", "x")), "x", "?", "?")
    assert "x" in a.registers["similarity"] and "x" not in b.registers["similarity"]


def test_duplicate_name_names_both_classes_and_modules():
    first = plugin_module("pkg_one.metrics", metric_class("same", "pkg_one.metrics"))
    second = plugin_module("pkg_two.metrics", metric_class("same", "pkg_two.metrics"))
    with pytest.raises(DuplicateNameError) as err:  # strict: the registers are collected at once
        get_plugin_manager(builtins=False, autoload=False, extra=[("one", first), ("two", second)])
    msg = str(err.value)
    assert "'same'" in msg
    assert "pkg_one.metrics.Metric_same" in msg and "pkg_two.metrics.Metric_same" in msg
    assert "'one'" in msg and "'two'" in msg


def test_unknown_name_lists_known_names():
    mod = plugin_module("m", metric_class("alpha", "m"), metric_class("beta", "m"))
    pm = get_plugin_manager(builtins=False, autoload=False, extra=[("m", mod)])
    with pytest.raises(UnknownNameError) as err:
        pm.registers["similarity"].get("gamma")
    assert str(err.value) == "unknown similarity 'gamma'; known: alpha, beta"


def test_class_without_plugin_name_or_wrong_base_is_reported():
    bad = types.ModuleType("bad")
    bad.megatron_register_similarity_metrics = hookimpl(lambda: [object])
    good = plugin_module("good", metric_class("fine", "good"))
    pm = get_plugin_manager(builtins=False, autoload=False, extra=[("bad", bad), ("good", good)], strict=False)
    assert pm.registers["similarity"].names() == ["fine"]
    assert len(pm.failures) == 1 and pm.failures[0].plugin == "bad"
    assert "no PLUGIN_NAME" in pm.failures[0].reason


def test_a_raising_registration_hook_is_reported_and_others_keep_working():
    broken = types.ModuleType("broken")

    @hookimpl
    def megatron_register_similarity_metrics():
        raise RuntimeError("database offline\nsecond line")

    broken.megatron_register_similarity_metrics = megatron_register_similarity_metrics
    good = plugin_module("good", metric_class("fine", "good"))
    pm = get_plugin_manager(builtins=False, autoload=False, extra=[("broken", broken), ("good", good)], strict=False)
    assert pm.registers["similarity"].names() == ["fine"]
    (failure,) = pm.failures
    assert failure.plugin == "broken" and failure.stage == "registration"
    assert failure.hook == "megatron_register_similarity_metrics"
    assert failure.reason == "RuntimeError: database offline second line"  # one line
    # a later registration makes the registers be collected again: the failure is still reported once
    pm.register_plugin(plugin_module("late", metric_class("late", "late")), "late", "?", "?")
    assert "late" in pm.registers["similarity"] and len(pm.failures) == 1
    with pytest.raises(PluginError, match="'broken'.*registration hook.*database offline"):
        get_plugin_manager(builtins=False, autoload=False, extra=[("broken", broken), ("good", good)])


def test_entry_point_plugin_is_listed_and_usable_by_name(fake_installed, capsys):
    fake_installed(ks_dist())
    pm = get_plugin_manager(builtins=False)
    assert pm.info["ks_similarity"].package == "megatron-ks-similarity"
    assert pm.info["ks_similarity"].version == "1.0.0"
    cls = pm.registers["similarity"].get("ks-intensity")
    assert cls.__module__ == "megatron_ks_similarity.plugin"
    assert main(["plugins", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["plugins"]
    (row,) = [r for r in rows if r["name"] == "ks-intensity"]
    assert row["kind"] == "similarity" and row["package"] == "megatron-ks-similarity" and row["version"] == "1.0.0"
    assert row["hooks"] == ["megatron_register_similarity_metrics"]


def test_plugin_that_fails_to_import_is_reported_with_its_package(fake_installed, capsys):
    broken_ep = md.EntryPoint("broken_plugin", "megatron_no_such_module_xyz.plugin", "megatron")
    fake_installed(FakeDist("broken-pkg", "0.3", [broken_ep]), ks_dist())
    pm = get_plugin_manager(builtins=False, strict=False)
    (failure,) = pm.failures
    assert (failure.plugin, failure.package) == ("broken_plugin", "broken-pkg")
    assert "ModuleNotFoundError" in failure.reason and "\n" not in failure.reason
    assert "ks-intensity" in pm.registers["similarity"]  # the others keep working
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "broken_plugin" in out and "broken-pkg" in out and "Traceback" not in out
    assert out.count("plugin 'broken_plugin'") == 1  # listed once
    assert "MEGATRON_BLOCK_PLUGINS=broken_plugin" in out  # with the fix


def test_autoload_can_be_turned_off(fake_installed, monkeypatch):
    fake_installed(ks_dist())
    monkeypatch.setenv("MEGATRON_DISABLE_PLUGIN_AUTOLOAD", "1")
    pm = get_plugin_manager(builtins=False)
    assert "ks-intensity" not in pm.registers["similarity"]


def test_named_plugins_can_be_blocked(fake_installed, monkeypatch):
    fake_installed(ks_dist())
    monkeypatch.setenv("MEGATRON_BLOCK_PLUGINS", "ks_similarity, wasserstein")
    pm = get_plugin_manager()
    assert "ks-intensity" not in pm.registers["similarity"]
    assert "wasserstein" not in pm.registers["similarity"]
    assert "coco" in pm.info  # unblocked built-ins still load


def test_misspelt_hook_fails_loudly():
    typo = types.ModuleType("typo")
    typo.megatron_regster_learners = hookimpl(lambda: [])
    with pytest.raises(PluginError) as err:
        get_plugin_manager(builtins=False, autoload=False, extra=[("typo", typo)])
    assert "'typo'" in str(err.value) and "megatron_regster_learners" in str(err.value)
    assert "MEGATRON_BLOCK_PLUGINS=typo" in str(err.value)
    # not strict (`megatron plugins`): listed as a failure, the plugin unregistered, the others kept
    pm = get_plugin_manager(autoload=False, extra=[("typo", typo)], strict=False)
    assert [f.plugin for f in pm.failures] == ["typo"] and not pm.has_plugin("typo")
    assert "reptile" in pm.registers["learner"]


def test_hookimpl_with_a_wrong_argument_name_is_reported():
    wrong = types.ModuleType("wrong")

    @hookimpl
    def megatron_run_start(cfg, run_dir):  # the spec says `config`
        pass

    wrong.megatron_run_start = megatron_run_start
    pm = get_plugin_manager(builtins=False, autoload=False, extra=[("wrong", wrong)], strict=False)
    (failure,) = pm.failures
    assert failure.plugin == "wrong" and failure.stage == "hooks" and failure.hook == "megatron_run_start"
    assert "'cfg'" in failure.reason and "megatron_run_start(config, run_dir)" in failure.reason
    assert not pm.has_plugin("wrong")
    with pytest.raises(PluginError) as err:  # strict (every command but `plugins`): an error, not a warning
        get_plugin_manager(builtins=False, autoload=False, extra=[("wrong", wrong)])
    msg = str(err.value)
    assert "'wrong'" in msg and "megatron_run_start" in msg and "'cfg'" in msg and "MEGATRON_BLOCK_PLUGINS=wrong" in msg


def test_fixture_for_plugin_authors(make_plugin_manager):
    pm = make_plugin_manager(plugin_module("mine", metric_class("mine-metric", "mine")), builtins=False)
    assert pm.registers["similarity"].names() == ["mine-metric"]


def test_cli_plugins_lists_every_builtin_kind(capsys):
    assert main(["plugins", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["failures"] == []
    kinds = {(r["kind"], r["name"]) for r in data["plugins"]}
    for expected in [("dataset", "medsynth"), ("detector", "yolox"), ("learner", "reptile"), ("similarity", "wasserstein")]:
        assert expected in kinds


# --- loud failures: every command that uses plugins stops before work, exit 2, the message printed once --------
def broken_dist() -> FakeDist:
    return FakeDist("broken-pkg", "0.3", [md.EntryPoint("broken_plugin", "megatron_no_such_module_xyz.plugin", "megatron")])


def misspelt_dist(tmp_path: Path, monkeypatch) -> FakeDist:
    """An installed plugin whose logger hook has a misspelt argument (`stat` for `stats`)."""
    (tmp_path / "megatron_misspelt_logger.py").write_text(
        "from megatron import hookimpl\n\n\n@hookimpl\ndef megatron_meta_step_end(learner, meta_epoch, step, stat):\n"
        "    print(stat)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return FakeDist("misspelt-logger", "2.0", [md.EntryPoint("misspelt", "megatron_misspelt_logger", "megatron")])


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


COMMANDS_USING_PLUGINS = {
    "run": lambda out: ["run", "--out", str(out), "--no-progress"],
    "pretrain": lambda out: ["pretrain", "--out", str(out / "ckpt.pt"), "--no-progress"],
    "benchmark": lambda out: ["benchmark", "--out", str(out), "--learners", "reptile", "--seeds", "0", "--dry-run"],
    "similarity": lambda out: ["similarity", "--out", str(out), "--no-plots"],
    "data export": lambda out: ["data", "export", "medsynth", "--out", str(out)],
    "config validate": lambda out: ["config", "validate", str(_write(out.parent / "exp.yaml", "seed: 1\n"))],
    "docs": lambda out: ["docs", "reptile", "--out", str(out)],
}


@pytest.mark.parametrize("command", sorted(COMMANDS_USING_PLUGINS))
def test_every_command_stops_before_work_when_a_plugin_failed_to_import(command, fake_installed, tmp_path, capsys):
    fake_installed(broken_dist(), ks_dist())
    out = tmp_path / "out"
    assert main(COMMANDS_USING_PLUGINS[command](out)) == 2
    err = capsys.readouterr().err
    assert err.count("plugin 'broken_plugin'") == 1, err  # printed once
    assert "broken-pkg" in err and "failed to import" in err and "ModuleNotFoundError" in err
    assert "MEGATRON_BLOCK_PLUGINS=broken_plugin" in err and "-p no:broken_plugin" in err
    assert "Traceback" not in err
    assert not out.exists()  # nothing was started


def test_a_misspelt_hook_argument_stops_run_naming_plugin_package_hook_and_argument(fake_installed, tmp_path,
                                                                                   monkeypatch, capsys):
    fake_installed(misspelt_dist(tmp_path, monkeypatch))
    assert main(["run", "--out", str(tmp_path / "runs"), "--no-progress"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "plugin 'misspelt' (package misspelt-logger)" in err
    assert "megatron_meta_step_end" in err and "'stat'" in err
    assert "MEGATRON_BLOCK_PLUGINS=misspelt" in err
    assert not (tmp_path / "runs").exists()
    # `megatron plugins` still lists everything, the failure included, and exits 0
    assert main(["plugins", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    (failure,) = data["failures"]
    assert failure["plugin"] == "misspelt" and failure["stage"] == "hooks" and "MEGATRON_BLOCK_PLUGINS" in failure["fix"]
    assert any(r["name"] == "reptile" for r in data["plugins"])


def test_blocking_the_failed_plugin_lets_commands_work(fake_installed, monkeypatch):
    fake_installed(broken_dist(), ks_dist())
    monkeypatch.setenv("MEGATRON_BLOCK_PLUGINS", "broken_plugin")
    pm = get_plugin_manager()
    assert pm.failures == [] and "ks-intensity" in pm.registers["similarity"]


def test_an_unknown_name_lists_the_known_ones_and_the_plugins_that_failed(fake_installed):
    fake_installed(broken_dist(), ks_dist())
    pm = get_plugin_manager(builtins=False, strict=False)
    with pytest.raises(UnknownNameError) as err:
        pm.registers["learner"].get("meta-sgd")
    msg = str(err.value)
    assert "unknown learner 'meta-sgd'" in msg
    assert "failed to load" in msg and "'broken_plugin'" in msg and "broken-pkg" in msg


def test_loggers_are_a_plugin_kind_with_the_builtins_registered():
    pm = get_plugin_manager(autoload=False)
    assert {"tensorboard", "csv"} <= set(pm.registers["logger"].names())
    rows = {(r["kind"], r["name"]) for r in pm.plugins_table()}
    assert ("logger", "tensorboard") in rows and ("logger", "csv") in rows


def test_run_record_lists_every_plugin_the_run_uses_with_package_and_version(fake_installed):
    from megatron.config import load_config
    from megatron.training.record import collect_plugin_versions

    watcher = types.ModuleType("watcher")
    watcher.megatron_run_end = hookimpl(lambda run_dir, record: None)
    fake_installed(ks_dist())
    pm = get_plugin_manager(extra=[("watcher", watcher)])
    cfg = load_config(None, {"learner.name": "maml", "similarity.select_sources": 2, "similarity.metric": "ks-intensity",
                             "loggers": ["csv"]})
    used = {(e["kind"], e["name"]): e for e in collect_plugin_versions(cfg, pm, ["maml", "finetune"])}
    assert used[("similarity", "ks-intensity")] | {} == {
        "kind": "similarity", "name": "ks-intensity", "plugin": "ks_similarity", "package": "megatron-ks-similarity",
        "version": "1.0.0", "builtin": False}
    version = megatron.__version__
    for key in [("dataset", "medsynth"), ("detector", "yolox"), ("learner", "maml"), ("learner", "finetune"),
                ("logger", "csv")]:
        assert used[key]["package"] == "megatron" and used[key]["version"] == version and used[key]["builtin"]
    assert used[("hooks", "watcher")]["hooks"] == ["megatron_run_end"]  # a lifecycle plugin is called: listed
    assert ("similarity", "wasserstein") not in used and ("learner", "reptile") not in used  # not used: not listed
