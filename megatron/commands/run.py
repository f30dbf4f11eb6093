"""``megatron run``."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="(being built)")
    p.set_defaults(func=lambda args: print("megatron run: not built yet") or 1)
