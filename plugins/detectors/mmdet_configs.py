"""Finding, listing and reading MMDetection config files for the ``mmdet`` detector plugin.

A config is named either by its path inside the installed mmdet package (``mmdet/.mim/configs``, e.g.
``rtmdet/rtmdet_tiny_8xb32-300e_coco.py``) or by a path to the user's own config file (``_base_`` inheritance
is resolved by ``mmengine.Config.fromfile``). Nothing is ever downloaded: every pretrained-weight reference in
the model config is removed (:func:`strip_pretrained`), with one log line per removed URL.
"""
from __future__ import annotations

import difflib
import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

from megatron.errors import ConfigError

log = logging.getLogger(__name__)

#: how many close names a "config not found" error lists
CLOSE_NAMES_SHOWN = 5


def mmdet_config_dir() -> Path:
    """The folder of config files shipped inside the installed mmdet package."""
    import mmdet  # optional dependency: only the mmdet detectors need it

    return Path(mmdet.__file__).parent / ".mim" / "configs"


@lru_cache(maxsize=1)
def packaged_config_names() -> tuple[str, ...]:
    """Every model config shipped with mmdet, relative to :func:`mmdet_config_dir` (``_base_`` parts excluded)."""
    root = mmdet_config_dir()
    return tuple(sorted(str(p.relative_to(root)) for p in root.rglob("*.py")
                        if "_base_" not in p.parts and "__pycache__" not in p.parts))


def configs_by_family() -> dict[str, list[str]]:
    """The packaged config names grouped by their folder (mmdet's family folders: ``rtmdet``, ``fcos`` ...)."""
    out: dict[str, list[str]] = {}
    for name in packaged_config_names():
        out.setdefault(name.split("/", 1)[0], []).append(name)
    return out


def resolve_config(name_or_path: str) -> Path:
    """The config file for a packaged name or a user path; a :class:`ConfigError` listing the closest packaged
    names when neither exists."""
    own = Path(name_or_path).expanduser()
    if own.is_file():
        return own.resolve()
    packaged = mmdet_config_dir() / name_or_path
    if packaged.is_file():
        return packaged
    names = packaged_config_names()
    close = difflib.get_close_matches(name_or_path, names, n=CLOSE_NAMES_SHOWN, cutoff=0.4)
    if not close:  # a bare file name (no family folder): compare with the file names alone
        by_file = {n.rsplit("/", 1)[-1]: n for n in names}
        close = [by_file[f] for f in difflib.get_close_matches(Path(name_or_path).name, list(by_file),
                                                               n=CLOSE_NAMES_SHOWN, cutoff=0.4)]
    hint = ("closest packaged configs: " + ", ".join(close)) if close else \
        "no packaged config has a similar name"
    raise ConfigError(
        f"detector mmdet: config {name_or_path!r} is neither a file nor a config inside the installed mmdet "
        f"package ({mmdet_config_dir()}); {hint}. `megatron detectors --configs` lists every packaged config."
    )


def read_config(path: Path, cfg_options: dict[str, Any] | None = None) -> Any:
    """``mmengine.Config.fromfile(path)`` (``_base_`` resolved) with the dotted ``cfg_options`` merged in
    (e.g. ``{"model.backbone.depth": 18}``), as mmdet's own ``--cfg-options`` does."""
    from mmengine.config import Config  # optional dependency: only the mmdet detectors need it

    try:
        cfg = Config.fromfile(str(path))
    except Exception as exc:  # a syntax error or a missing _base_ file: mmengine's message, with the file
        raise ConfigError(f"detector mmdet: cannot read config {path}: {type(exc).__name__}: {exc}") from exc
    if cfg_options:
        cfg.merge_from_dict(dict(cfg_options))
    if "model" not in cfg:
        raise ConfigError(f"detector mmdet: config {path} has no `model` entry (is it an mmdet model config?)")
    return cfg


def model_type(name_or_path: str, cfg_options: dict[str, Any] | None = None) -> str:
    """The detector type (``cfg.model.type``) a config builds, read without building anything."""
    return str(read_config(resolve_config(name_or_path), cfg_options).model.get("type", ""))


def strip_pretrained(cfg: Any, where: str = "model") -> Any:
    """Remove every pretrained-weight reference (``init_cfg`` of type ``Pretrained`` or with a ``checkpoint``,
    ``pretrained=``, ``load_from``) from a config dict, recursively, so building the model never downloads
    anything; each removed reference is logged with its key path."""
    if isinstance(cfg, dict):
        out = {}
        for key, value in cfg.items():
            if key in ("pretrained", "load_from") or (key == "init_cfg" and _is_pretrained_init(value)):
                if value:
                    log.info("mmdet config: removed %s.%s = %s (megatron never downloads weights; start from a "
                             "local file with detector.checkpoint)", where, key, _checkpoint_of(value))
                continue
            out[key] = strip_pretrained(value, f"{where}.{key}")
        return out
    if isinstance(cfg, (list, tuple)):
        return type(cfg)(strip_pretrained(v, f"{where}.{i}") for i, v in enumerate(cfg))
    return cfg


def _is_pretrained_init(init_cfg: Any) -> bool:
    items = init_cfg if isinstance(init_cfg, (list, tuple)) else [init_cfg]
    return any(isinstance(i, dict) and (i.get("type") == "Pretrained" or "checkpoint" in i) for i in items)


def _checkpoint_of(value: Any) -> str:
    items = value if isinstance(value, (list, tuple)) else [value]
    found = [str(i.get("checkpoint")) for i in items if isinstance(i, dict) and i.get("checkpoint")]
    return ", ".join(found) if found else repr(value)
