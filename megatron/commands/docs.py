"""``megatron docs NAME``: write (or check) the documentation page of any installed plugin, third-party
included: its title, docstring and options table, the same form as the built-in pages in registry_docs/."""
from __future__ import annotations

# lazy imports: start-up time (heavy modules are imported inside the command functions; see megatron/commands/__init__.py)

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "docs", help="write the options page of an installed plugin (built-in or third-party)",
        description="Write DIR/<kind>/<NAME>.md for the installed plugin NAME: a new page gets its title, the class "
        "docstring and its options table (from the plugin's Options model) to complete by hand; an existing page "
        "keeps its text and only the table between <!-- options:start --> and <!-- options:end --> is rewritten. "
        "--check writes nothing and exits 1 when the page is missing or its table is stale (for a plugin's CI). "
        "The built-in pages live in registry_docs/plugins/ (`python -m megatron.docs`).")
    p.add_argument("name", metavar="NAME", help="plugin name, as `megatron plugins` lists it (e.g. meta-sgd)")
    p.add_argument("--kind", help="plugin kind, when NAME is used by several (dataset, detector, learner, "
                   "similarity, logger)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="folder for the page: DIR/<kind>/<NAME>.md (default: docs; a built-in plugin's page is its "
                   "registry_docs/plugins/ page)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if the page is missing or stale")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from megatron import get_plugin_manager
    from megatron.runtime.console import output_console
    from megatron.docs import find_plugin, page_problem, plugin_page_path, write_page

    pm = get_plugin_manager()
    kind, cls = find_plugin(pm, args.name, args.kind)
    info = pm.info.get(pm.registers[kind].owner(args.name))
    if args.out is None and info is not None and info.builtin:
        page = plugin_page_path(kind, args.name)  # where the built-in pages live (python -m megatron.docs)
    else:
        page = Path(args.out or "docs") / kind / f"{args.name}.md"
    console = output_console()
    if args.check:
        problem = page_problem(cls, page, kind, args.name)
        console.print(problem or f"{page} is up to date", highlight=False)
        return 1 if problem else 0
    existed = page.exists()
    write_page(cls, kind, args.name, page)
    console.print(f"{'updated the options table of' if existed else 'wrote'} {page}", highlight=False)
    return 0
