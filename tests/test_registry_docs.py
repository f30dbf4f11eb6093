"""registry_docs/ stays in step with the code: one page per hook and per built-in plugin, a contract page per
plugin kind, and the hook pages list exactly the payload keys the runner sends."""
import sys
from pathlib import Path

import pytest

from megatron import hookimpl
from megatron.docs import hook_page_path, hook_signature, options_table, problems
from megatron.pluginmanager import get_plugin_manager


def test_every_hook_and_builtin_plugin_has_an_up_to_date_page():
    pm = get_plugin_manager(autoload=False)
    assert pm.failures == []
    assert problems(pm) == []


def test_a_drifted_hook_signature_is_caught(tmp_path, monkeypatch):
    import megatron.docs as docs

    pm = get_plugin_manager(builtins=False, autoload=False)
    page = tmp_path / "hooks" / "megatron_run_end.md"
    page.parent.mkdir(parents=True)
    page.write_text("# megatron_run_end\n\n```python\ndef megatron_run_end(run_dir: Path) -> None\n```\n")
    monkeypatch.setattr(docs, "DOCS", tmp_path)
    found = [p for p in problems(pm) if "megatron_run_end" in p]
    assert found and "signature differs" in found[0]
    assert hook_signature(pm, "megatron_run_end") in found[0]


def test_hook_pages_show_an_example():
    pm = get_plugin_manager(builtins=False, autoload=False)
    for hook in [n for n in dir(pm.hook) if n.startswith("megatron_")]:
        text = hook_page_path(hook).read_text()
        assert "## Parameters" in text and "## Returns" in text and "@hookimpl" in text


def test_options_table_lists_every_option():
    from megatron.api.learner import LearnerOptions

    class Opts(LearnerOptions):
        steps: int = 3

    class L:
        Options = Opts

    table = options_table(L)
    assert "| `steps` | `int` | `3` |" in table


# --- the hook pages document exactly the payload keys the runner sends ------------------------------------------
def test_documented_keys_are_read_from_the_key_tables():
    from megatron.docs import documented_keys

    assert documented_keys("megatron_meta_step_end") == {"stats": {"loss", "global_step", "compute_spent"}}
    stages = documented_keys("megatron_stage_start")
    assert stages["prepare"] == set() and stages["select"] == {"metric", "k"}
    assert "mAP50" in documented_keys("megatron_evaluation_end")["metrics"]


class PayloadRecorder:
    """Every lifecycle payload a run sends."""

    def __init__(self):
        self.stats: list[dict] = []
        self.metrics: list[tuple[str, dict]] = []
        self.stage_start: dict[str, set[frozenset]] = {}
        self.stage_end: dict[str, set[frozenset]] = {}

    @hookimpl
    def megatron_meta_step_end(self, learner, meta_epoch, step, stats):
        self.stats.append(dict(stats))

    @hookimpl
    def megatron_evaluation_end(self, learner, meta_epoch, split, metrics):
        self.metrics.append((split, dict(metrics)))

    @hookimpl
    def megatron_stage_start(self, stage, info):
        self.stage_start.setdefault(stage, set()).add(frozenset(info))

    @hookimpl
    def megatron_stage_end(self, stage, info):
        self.stage_end.setdefault(stage, set()).add(frozenset(info))


@pytest.fixture(scope="module")
def payloads(tmp_path_factory):
    """One tiny run that passes through every stage: stage 1, source selection, a validation split, a baseline."""
    import learners_for_tests
    import tiny_detector
    import torch

    from megatron.config import load_config
    from megatron.training.runner import run_experiment

    tmp = tmp_path_factory.mktemp("payloads")
    cfg = load_config(None, {
        "data.datasets": [{"plugin": "blobs", "options": {"images_per_task": 10}}], "data.target": "target",
        "data.shots": 4, "data.eval_images": 4, "data.validation_images": 2, "data.input_size": 64,
        "data.cache_dir": str(tmp / "cache"), "detector.name": "tiny", "learner.name": "joint_test",
        "training.meta_epochs": 1, "training.steps_per_epoch": 1, "training.finetune_epochs": 1,
        "training.pretrain_epochs": 1, "similarity.select_sources": 2, "similarity.metric": "wasserstein",
        "similarity.sample_size": 4, "output.dir": str(tmp / "runs"), "output.plots": False,
        "output.save_models": False,
    })
    rec = PayloadRecorder()
    pm = get_plugin_manager(autoload=False, extra=[("tiny_detector", tiny_detector),
                                                    ("learners_for_tests", learners_for_tests), ("payloads", rec)])
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_experiment(cfg, run_dir=tmp / "run", pm=pm, progress=False)
    finally:
        torch.set_num_threads(before)
    return rec


def test_meta_step_and_evaluation_pages_list_exactly_the_keys_the_runner_sends(payloads):
    from megatron.docs import documented_keys

    assert payloads.stats and payloads.metrics
    documented = documented_keys("megatron_meta_step_end")["stats"]
    for stats in payloads.stats:  # joint_test and the finetune baseline return only `loss` of their own
        assert set(stats) == documented, f"stats keys {sorted(stats)} vs documented {sorted(documented)}"
    documented = documented_keys("megatron_evaluation_end")["metrics"]
    assert {split for split, _ in payloads.metrics} == {"validation", "heldout"}
    for split, metrics in payloads.metrics:
        assert set(metrics) == documented, (f"{split} metrics: sent but not documented {sorted(set(metrics) - documented)}, "
                                            f"documented but not sent {sorted(documented - set(metrics))}")


@pytest.mark.parametrize("hook", ["megatron_stage_start", "megatron_stage_end"])
def test_stage_pages_list_exactly_the_info_keys_of_every_stage(payloads, hook):
    from megatron.docs import documented_keys

    documented = documented_keys(hook)
    sent = payloads.stage_start if hook == "megatron_stage_start" else payloads.stage_end
    assert set(sent) == set(documented) == {"prepare", "select", "pretrain", "meta_train", "meta_epoch", "adapt"}
    for stage, key_sets in sent.items():
        for keys in key_sets:
            assert set(keys) == documented[stage], (f"{hook} {stage}: sent {sorted(keys)}, documented "
                                                    f"{sorted(documented[stage])}")


# --- generating pages: python -m megatron.docs and `megatron docs NAME` ------------------------------------------
def snapshot(folder: Path) -> dict[str, str]:
    return {str(p): p.read_text() for p in sorted(folder.rglob("*.md"))}


def test_python_m_megatron_docs_help_prints_help_and_changes_nothing(capsys):
    from megatron.docs import DOCS, main

    before = snapshot(DOCS)
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert "--check" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--no-such-option"])
    assert snapshot(DOCS) == before


def third_party_module(tmp_path: Path, description: str) -> str:
    (tmp_path / "my_thirdparty_learner.py").write_text(f'''
from pydantic import Field
from megatron import hookimpl
from megatron.api.learner import LearnerOptions, MetaLearner


class Opts(LearnerOptions):
    boldness: float = Field(0.5, description="{description}")


class Bold(MetaLearner):
    """A bold learner."""
    PLUGIN_NAME = "bold"
    Options = Opts

    def meta_step(self, episodes):
        return {{"loss": 0.0}}


@hookimpl
def megatron_register_learners():
    return [Bold]
''')
    return "my_thirdparty_learner"


def test_megatron_docs_writes_and_checks_the_page_of_a_third_party_plugin(tmp_path, monkeypatch, capsys):
    from megatron.cli import main

    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("MEGATRON_PLUGINS", third_party_module(tmp_path, "how bold"))
    out = tmp_path / "docs"
    assert main(["docs", "bold", "--check", "--out", str(out)]) == 1  # no page yet
    assert main(["docs", "bold", "--out", str(out)]) == 0
    page = out / "learner" / "bold.md"
    text = page.read_text()
    assert text.startswith("# bold (learner)") and "A bold learner." in text
    assert "| `boldness` | `float` | `0.5` | how bold |" in text
    page.write_text(text.replace("A bold learner.", "Hand-written prose."))
    assert main(["docs", "bold", "--check", "--out", str(out)]) == 0
    # the Options change: --check says the page is stale; writing keeps the prose and renews the table
    sys.modules.pop("my_thirdparty_learner", None)
    third_party_module(tmp_path, "how very bold")
    assert main(["docs", "bold", "--check", "--out", str(out)]) == 1
    assert main(["docs", "bold", "--out", str(out)]) == 0
    text = page.read_text()
    assert "Hand-written prose." in text and "how very bold" in text and "| how bold |" not in text
    assert main(["docs", "no-such-plugin", "--out", str(out)]) == 2
    assert "no plugin named 'no-such-plugin'" in capsys.readouterr().err


def test_docs_check_of_a_built_in_plugin_reads_its_registry_docs_page(capsys):
    from megatron.cli import main

    assert main(["docs", "coco", "--check"]) == 0  # was: "docs/dataset/coco.md: missing page" from any folder
    assert "registry_docs/plugins/datasets/coco.md is up to date" in capsys.readouterr().out
