"""``megatron detectors``: the detector plugins, and (``--configs``) the mmdet configs the ``mmdet`` plugin can
build, by family, with the families megatron has verified marked."""
from __future__ import annotations

# lazy imports: start-up time (mmdet is imported inside the command function; see megatron/commands/__init__.py)

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("detectors", help="list the detector plugins and (--configs) the packaged mmdet configs",
                       description="List the detector plugins. With --configs: every model config shipped inside "
                       "the installed mmdet package, by family, each usable as `detector: {name: mmdet, options: "
                       "{config: FAMILY/FILE.py}}`; verified families (tested: loss, predict, MAML/ANIL/Reptile, "
                       "resume) are marked.")
    p.add_argument("--configs", action="store_true", help="list the packaged mmdet configs by family")
    p.add_argument("--family", action="append", help="only these families (with --configs)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from megatron import get_plugin_manager

    if args.configs:
        return _list_configs(args)
    reg = get_plugin_manager().register_of("detector")
    rows = [{"name": n, "class": reg.get(n).__name__, "doc": (reg.get(n).__doc__ or "").strip().splitlines()[0]}
            for n in reg.names()]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['name']:<14} {r['doc']}")
        print("\n`megatron detectors --configs` lists the mmdet configs the `mmdet` plugin builds.")
    return 0


def _list_configs(args: argparse.Namespace) -> int:
    from megatron_plugins.detectors.mmdet import FAMILIES, VERIFIED_FAMILIES  # mmdet: only this listing needs it
    from megatron_plugins.detectors.mmdet_configs import configs_by_family

    by_family = configs_by_family()
    if args.family:
        by_family = {f: names for f, names in by_family.items() if f in args.family}
    known = {f.name: f for f in FAMILIES}
    if args.json:
        print(json.dumps({f: {"verified": f in VERIFIED_FAMILIES, "configs": names} for f, names in by_family.items()},
                         indent=2))
        return 0
    for family, names in by_family.items():
        mark = "verified" if family in VERIFIED_FAMILIES else "known, not verified" if family in known else "untested"
        print(f"{family} ({mark}, {len(names)} configs)")
        for name in names:
            print(f"  {name}")
    return 0
