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
from megatron.similarity import SimilarityMetric

EXAMPLE_SRC = Path(__file__).resolve().parent.parent / "examples" / "megatron-ks-similarity" / "src"


def metric_class(name: str, module: str) -> type:
    return type("Metric_" + name.replace("-", "_"), (SimilarityMetric,), {"PLUGIN_NAME": name, "__module__": module})


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
    pm = get_plugin_manager(builtins=False, autoload=False, extra=[("one", first), ("two", second)])
    with pytest.raises(DuplicateNameError) as err:
        pm.registers
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
    pm = get_plugin_manager(builtins=False, autoload=False, extra=[("bad", bad), ("good", good)])
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
    pm = get_plugin_manager(builtins=False, autoload=False, extra=[("broken", broken), ("good", good)])
    assert pm.registers["similarity"].names() == ["fine"]
    (failure,) = pm.failures
    assert failure.plugin == "broken"
    assert failure.reason == "RuntimeError: database offline second line"  # one line


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
    pm = get_plugin_manager(builtins=False)
    (failure,) = pm.failures
    assert (failure.plugin, failure.package) == ("broken_plugin", "broken-pkg")
    assert "ModuleNotFoundError" in failure.reason and "\n" not in failure.reason
    assert "ks-intensity" in pm.registers["similarity"]  # the others keep working
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "broken_plugin" in out and "broken-pkg" in out and "Traceback" not in out


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


def test_hookimpl_with_a_wrong_argument_name_is_reported():
    wrong = types.ModuleType("wrong")

    @hookimpl
    def megatron_run_start(cfg, run_dir):  # the spec says `config`
        pass

    wrong.megatron_run_start = megatron_run_start
    pm = get_plugin_manager(builtins=False, autoload=False, extra=[("wrong", wrong)])
    (failure,) = pm.failures
    assert failure.plugin == "wrong"
    assert "cfg" in failure.reason
    assert not pm.has_plugin("wrong")


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
