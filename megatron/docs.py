"""registry_docs/: what each page must say, generated from the code so a test can compare.

- ``registry_docs/hooks/<hook>.md`` starts with ``# <hook>`` and holds, in a ```python block, the exact
  signature line :func:`hook_signature` gives. A lifecycle hook whose argument is a dict lists its keys in a
  table (:func:`documented_keys` reads them; a test compares them with what the runner sends).
- ``registry_docs/plugins/<kind folder>/<name>.md`` (the folder named as in ``plugins/``) holds, between ``<!-- options:start -->`` and
  ``<!-- options:end -->``, exactly the table :func:`options_table` gives for the plugin class.
- ``registry_docs/contracts/<kind>.md``: what a plugin of each kind implements (written by hand).

``python -m megatron.docs`` (re)writes the generated parts of the built-in plugins' pages and creates missing
pages with a skeleton to fill in; ``--check`` only lists what is missing or stale (exit 1 if anything is).
For any installed plugin, third-party included: ``megatron docs NAME [--out DIR]``.
"""
from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from megatron.pluginmanager import KIND_FOLDERS
from megatron import hookspecs
from megatron.errors import ConfigError
from megatron import get_plugin_manager

DOCS = Path(__file__).resolve().parent.parent / "registry_docs"
START, END = "<!-- options:start -->", "<!-- options:end -->"


def hook_signature(pm: Any, hook_name: str) -> str:
    """``def megatron_xxx(a: int, b: str) -> None`` as written in hookspecs.py."""

    fn = getattr(hookspecs, hook_name)
    return f"def {hook_name}{inspect.signature(fn)}".replace("'", "")


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    text = text or str(annotation).replace("typing.", "")
    return re.sub(r"<class '([\w.]+)'>", r"\1", text).replace("pathlib.", "").replace("|", "\\|")


def options_table(cls: type) -> str:
    """A markdown table of ``cls.Options``: option, type, default, description."""
    model: type[BaseModel] = cls.Options
    lines = ["| option | type | default | description |", "| --- | --- | --- | --- |"]
    for name, field in model.model_fields.items():
        if field.default is not PydanticUndefined:
            default = repr(field.default)
        elif field.default_factory is not None:
            default = repr(field.default_factory())
        else:
            default = "required"
        desc = (field.description or "").replace("|", "\\|")
        lines.append(f"| `{name}` | `{_type_name(field.annotation)}` | `{default}` | {desc} |")
    if len(lines) == 2:
        lines.append("| (none) | | | |")
    return "\n".join(lines)


def hook_page_path(hook_name: str) -> Path:
    return DOCS / "hooks" / f"{hook_name}.md"


def plugin_page_path(kind: str, name: str) -> Path:
    return DOCS / "plugins" / KIND_FOLDERS.get(kind, kind) / f"{name}.md"


#: plugin kinds with a contract page ``registry_docs/contracts/<kind>.md``
CONTRACT_KINDS = ("learner", "dataset", "detector", "similarity", "logger")


def contract_page_path(kind: str) -> Path:
    return DOCS / "contracts" / f"{kind}.md"


def hook_names(pm: Any) -> list[str]:
    return sorted(n for n in dir(pm.hook) if n.startswith("megatron_"))


def problems(pm: Any, builtin_only: bool = True) -> list[str]:
    """Every missing or stale page, one line each (empty: the docs match the code)."""
    out = []
    for hook in hook_names(pm):
        page = hook_page_path(hook)
        if not page.exists():
            out.append(f"{page}: missing page for hook {hook}")
        elif hook_signature(pm, hook) not in page.read_text():
            out.append(f"{page}: signature differs from the code; expected `{hook_signature(pm, hook)}`")
    for kind in CONTRACT_KINDS:
        if not contract_page_path(kind).exists():
            out.append(f"{contract_page_path(kind)}: missing contract page for {kind} plugins")
    for kind, reg in pm.registers.items():
        for name in reg.names():
            info = pm.info.get(reg.owner(name))
            if builtin_only and not (info is not None and info.builtin):
                continue
            problem = page_problem(reg.get(name), plugin_page_path(kind, name), kind, name)
            if problem:
                out.append(problem)
    return out


def page_problem(cls: type, page: Path, kind: str, name: str) -> str | None:
    """Why ``page`` is not the up-to-date page of plugin ``cls`` (``None``: it is)."""
    if not page.exists():
        return f"{page}: missing page for {kind} plugin {name}"
    m = re.search(re.escape(START) + r"\n(.*?)\n" + re.escape(END), page.read_text(), re.S)
    if not m or m.group(1).strip() != options_table(cls).strip():
        return f"{page}: options table differs from {name}'s Options model (run `megatron docs {name}`)"
    return None


def write_page(cls: type, kind: str, name: str, page: Path) -> Path:
    """Write ``page`` for plugin ``cls``: only the options table of an existing page is replaced; a missing page
    gets a skeleton (title, the class docstring, the options table) to complete by hand."""
    table = f"{START}\n{options_table(cls)}\n{END}"
    if page.exists():
        text = page.read_text()
        if START in text:
            text = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _m: table, text, flags=re.S)
        else:
            text = text.rstrip("\n") + "\n\n## Options\n\n" + table + "\n"
    else:
        page.parent.mkdir(parents=True, exist_ok=True)
        doc = inspect.getdoc(cls) or "(describe the plugin)"
        text = f"# {name} ({kind})\n\n{doc}\n\n## Options\n\n{table}\n"
    if not page.exists() or page.read_text() != text:
        page.write_text(text)
    return page


def write(pm: Any) -> list[Path]:
    """Write the page of every built-in plugin under ``registry_docs/plugins/``."""
    written = []
    for kind, reg in pm.registers.items():
        for name in reg.names():
            info = pm.info.get(reg.owner(name))
            if info is not None and info.builtin:
                written.append(write_page(reg.get(name), kind, name, plugin_page_path(kind, name)))
    return written


def find_plugin(pm: Any, name: str, kind: str | None = None) -> tuple[str, type]:
    """``(kind, class)`` of the plugin named ``name`` (any kind unless ``kind`` is given). Unknown: a
    ConfigError listing every plugin name per kind; a name used by several kinds needs ``kind``."""

    regs = pm.registers
    if kind is not None and kind not in regs:
        raise ConfigError(f"unknown plugin kind {kind!r}; kinds: {', '.join(regs)}")
    found = [(k, reg.get(name)) for k, reg in regs.items() if (kind is None or k == kind) and name in reg]
    if not found:
        known = "; ".join(f"{k}: {', '.join(reg.names()) or '(none)'}" for k, reg in regs.items())
        note = pm.failure_note() if hasattr(pm, "failure_note") else ""
        raise ConfigError(f"no plugin named {name!r}{f' of kind {kind}' if kind else ''}; known: {known}{note}")
    if len(found) > 1:
        raise ConfigError(f"{name!r} names plugins of several kinds ({', '.join(k for k, _ in found)}); "
                          "choose one with --kind")
    return found[0]


# --- payload keys documented on the hook pages ------------------------------------------------------------

def documented_keys(hook_name: str) -> dict[str, set[str]]:
    """The dict keys a lifecycle hook page documents, from its key tables.

    A table whose header is ``| key | ... |`` right under a heading naming an argument in backticks
    (``## Keys of `stats` ``) gives ``{"stats": {...}}`` (the backticked names of its first column; a row whose
    first cell has no backticks, e.g. "(the learner's own)", is prose). A table whose header starts
    ``| stage | keys of `info` |`` gives one entry per stage: ``{"prepare": {...}, ...}`` (every backticked name
    of its second column)."""
    text = hook_page_path(hook_name).read_text()
    out: dict[str, set[str]] = {}
    heading = None
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            m = re.search(r"`(\w+)`", line)
            heading = m.group(1) if m else None
        if line.startswith("|") and i + 1 < len(lines) and re.match(r"^\|\s*-", lines[i + 1]):
            header = [c.strip().lower() for c in line.strip().strip("|").split("|")]
            rows = []
            j = i + 2
            while j < len(lines) and lines[j].startswith("|"):
                rows.append([c.strip() for c in lines[j].strip().strip("|").split("|")])
                j += 1
            if header[0] == "stage" and len(header) > 1 and header[1].startswith("keys of"):
                for row in rows:
                    stage = row[0].strip("` ")
                    out[stage] = set(re.findall(r"`(\w+)`", row[1])) if len(row) > 1 else set()
            elif header[0] == "key" and heading:
                out[heading] = {k for row in rows for k in re.findall(r"^`(\w+)`$", row[0])}
            i = j
            continue
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m megatron.docs",
        description="Regenerate the options tables of the built-in plugins' pages in registry_docs/ (missing pages "
        "get a skeleton). --check only lists what is missing or stale. Third-party plugins: `megatron docs NAME`.")
    parser.add_argument("--check", action="store_true", help="list missing or stale pages and exit 1 if any; write nothing")
    args = parser.parse_args(argv)

    pm = get_plugin_manager(autoload=False)
    if args.check:
        found = problems(pm)
        print("\n".join(found) or "registry_docs/ matches the code")
        return 1 if found else 0
    for page in write(pm):
        print(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
