"""Problems found while reading a dataset: errors stop loading, warnings are counted and listed.

Readers return a list of :class:`Problem` instead of raising on the first bad record, so ``megatron data
check`` can list every problem at once; dataset plugins call :func:`raise_for_errors` to turn the errors into
one :class:`~megatron.errors.DataError` and log the warnings.
"""
from __future__ import annotations

import logging
import shlex
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from megatron.errors import DataError

log = logging.getLogger(__name__)

#: overshoot (pixels) past the image border that is clipped without a warning: rounding in annotation tools
BORDER_TOLERANCE = 1.0


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset: where (file + record), what, and how to fix it."""

    severity: Literal["error", "warning"]
    code: str  # short kind used for counting, e.g. "box_clipped"
    file: str
    record: str  # e.g. "image id 3", "annotation id 7", "line 4"; "" for the whole file
    message: str
    fix: str

    def __str__(self) -> str:
        where = f"{self.file} [{self.record}]" if self.record else self.file
        return f"{self.severity}: {where}: {self.message}; fix: {self.fix}"

    def to_dict(self) -> dict:
        return asdict(self)


def check_command_hint(source: str) -> str:
    """``run `megatron data check -c CONFIG` ...``: the command that lists every problem of ``source``."""
    path = Path(source).expanduser()
    by_path = path.is_dir() or (path.is_file() and path.suffix.lower() == ".json")
    direct = f"`megatron data check {shlex.quote(source)}`, or " if by_path else ""
    return f"run {direct}`megatron data check -c CONFIG` (CONFIG: your config file; every dataset through its plugin)"


def errors(problems: list[Problem]) -> list[Problem]:
    return [p for p in problems if p.severity == "error"]


def warning_counts(problems: list[Problem]) -> Counter:
    return Counter(p.code for p in problems if p.severity == "warning")


def raise_for_errors(problems: list[Problem], source: str, show: int = 8) -> None:
    """Raise one DataError listing the first ``show`` errors; log a count of each kind of warning.

    ``source`` names the dataset in the message (its annotation file or folder, as the user gave it). The
    message ends with a ``megatron data check`` command that works for it: ``-c CONFIG`` (every dataset of a
    config, through its own plugin) always; ``data check SOURCE`` too when ``source`` is something data check
    reads by path (a COCO ``.json`` file or a folder)."""
    errs = errors(problems)
    if errs:
        lines = "\n  ".join(str(p) for p in errs[:show])
        more = f"\n  ... and {len(errs) - show} more" if len(errs) > show else ""
        raise DataError(f"{source}: {len(errs)} error(s) in the dataset:\n  {lines}{more}\n"
                        f"{check_command_hint(source)} for the full list and a summary")
    for code, n in sorted(warning_counts(problems).items()):
        example = next(p for p in problems if p.code == code)
        log.warning("%s: %d x %s, e.g. %s", source, n, code, example)


def clean_box(x1: float, y1: float, x2: float, y2: float, width: int, height: int, file: str,
              record: str, problems: list[Problem]) -> np.ndarray | None:
    """The box clipped to the image, or None when it must be rejected; appends what happened to ``problems``.

    Policy (documented in the dataset plugin pages): non-finite -> error; non-positive width/height ->
    rejected with a warning; entirely outside the image -> rejected with a warning; partly outside -> clipped
    with a warning (overshoot up to :data:`BORDER_TOLERANCE` px is clipped silently).
    """
    coords = np.array([x1, y1, x2, y2], dtype=np.float64)
    if not np.all(np.isfinite(coords)):
        problems.append(Problem("error", "box_not_finite", file, record, f"box {coords.tolist()} is not finite",
                                "fix or delete this annotation"))
        return None
    if x2 <= x1 or y2 <= y1:
        problems.append(Problem("warning", "box_non_positive", file, record,
                                f"box has non-positive size (w={x2 - x1:g}, h={y2 - y1:g}); it is skipped",
                                "give the box a positive width and height or delete the annotation"))
        return None
    if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
        problems.append(Problem("warning", "box_outside", file, record,
                                f"box xyxy=({x1:g}, {y1:g}, {x2:g}, {y2:g}) lies entirely outside the "
                                f"{width}x{height} image; it is skipped",
                                "check the coordinate format (COCO: x, y, width, height in pixels; YOLO: "
                                "normalised cx cy w h) and the image size"))
        return None
    overshoot = max(-x1, -y1, x2 - width, y2 - height)
    clipped = np.array([max(x1, 0.0), max(y1, 0.0), min(x2, width), min(y2, height)], dtype=np.float32)
    if overshoot > BORDER_TOLERANCE:
        problems.append(Problem("warning", "box_clipped", file, record,
                                f"box xyxy=({x1:g}, {y1:g}, {x2:g}, {y2:g}) extends {overshoot:g} px past the "
                                f"{width}x{height} image; it was clipped to the image",
                                "correct the box so it lies inside the image"))
    if clipped[2] - clipped[0] <= 0 or clipped[3] - clipped[1] <= 0:
        problems.append(Problem("warning", "box_outside", file, record,
                                "box has no area inside the image after clipping; it is skipped",
                                "correct the box so it lies inside the image"))
        return None
    return clipped
