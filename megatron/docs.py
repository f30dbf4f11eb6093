"""registry_docs/: what each page must say, generated from the code so a test can compare.

- ``registry_docs/hooks/<hook>.md`` starts with ``# <hook>`` and holds, in a ```python block, the exact
  signature line :func:`hook_signature` gives.
- ``registry_docs/plugins/<kind>/<name>.md`` holds, between ``<!-- options:start -->`` and
  ``<!-- options:end -->``, exactly the table :func:`options_table` gives for the plugin class.

``python -m megatron.docs`` (re)writes the generated parts of existing pages and creates missing pages
with a skeleton to fill in; ``python -m megatron.docs --check`` lists what is missing or stale.
"""
from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

DOCS = Path(__file__).resolve().parent.parent / "registry_docs"
START, END = "<!-- options:start -->", "<!-- options:end -->"


def hook_signature(pm: Any, hook_name: str) -> str:
    """``def megatron_xxx(a: int, b: str) -> None`` as written in hookspecs.py."""
    from megatron import hookspecs

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
    return DOCS / "plugins" / kind / f"{name}.md"


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
    for kind, reg in pm.registers.items():
        for name in reg.names():
            if builtin_only and not pm.info.get(reg.owner(name), None) or (builtin_only and not pm.info[reg.owner(name)].builtin):
                continue
            page = plugin_page_path(kind, name)
            if not page.exists():
                out.append(f"{page}: missing page for {kind} plugin {name}")
                continue
            m = re.search(re.escape(START) + r"\n(.*?)\n" + re.escape(END), page.read_text(), re.S)
            if not m or m.group(1).strip() != options_table(reg.get(name)).strip():
                out.append(f"{page}: options table differs from {name}'s Options model (run `python -m megatron.docs`)")
    return out


def write(pm: Any) -> None:
    for kind, reg in pm.registers.items():
        for name in reg.names():
            if not pm.info[reg.owner(name)].builtin:
                continue
            page = plugin_page_path(kind, name)
            table = f"{START}\n{options_table(reg.get(name))}\n{END}"
            if page.exists():
                text = page.read_text()
                text = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _m: table, text, flags=re.S) if START in text else text + "\n## Options\n\n" + table + "\n"
            else:
                page.parent.mkdir(parents=True, exist_ok=True)
                doc = inspect.getdoc(reg.get(name)) or "(describe the plugin)"
                text = f"# {name} ({kind})\n\n{doc}\n\n## Options\n\n{table}\n"
            page.write_text(text)


if __name__ == "__main__":
    from megatron import get_plugin_manager

    pm = get_plugin_manager(autoload=False)
    if "--check" in sys.argv:
        found = problems(pm)
        print("\n".join(found) or "registry_docs/ matches the code")
        sys.exit(1 if found else 0)
    write(pm)
