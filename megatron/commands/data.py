"""``megatron data``."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="(being built)")
    p.set_defaults(func=lambda args: print("megatron data: not built yet") or 1)
