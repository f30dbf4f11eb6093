"""``megatron benchmark``."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("benchmark", help="(being built)")
    p.set_defaults(func=lambda args: print("megatron benchmark: not built yet") or 1)
