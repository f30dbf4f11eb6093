"""registry_docs/ stays in step with the code: one page per hook and per built-in plugin."""
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
    from megatron.learner import LearnerOptions

    class Opts(LearnerOptions):
        steps: int = 3

    class L:
        Options = Opts

    table = options_table(L)
    assert "| `steps` | `int` | `3` |" in table
