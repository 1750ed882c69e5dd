"""`--config qconvert.toml`: any command option, plus per-layer overrides, kept in the build's repo.

    bits = 4                      # any long option of the command, without the dashes
    per-channel = true
    exclude = ["classifier*"]
    min-snr = 20

    [[layer]]                     # per-layer overrides, matched by name or glob; later tables win
    match = "features.0.*"
    bits = 8
    granularity = "per-tensor"

    [[layer]]
    match = "head.weight"
    skip = true

    [[layer]]                     # in qconvert kmeans: these weights become int8 DequantizeLinear
    match = "stem.*"
    method = "linear"

Options given on the command line override the file.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import click

from qconvert.errors import InputError, UsageError
from qconvert.plan import Granularity, LayerOverride

LAYERS_KEY = "qconvert.layers"  # where the overrides wait in click's context meta
LAYER_KEYS = {"match", "bits", "granularity", "skip", "method"}


def load_config(ctx: click.Context, param: click.Parameter, path: Path | None) -> None:
    """Eager option callback: the file's options become the command's defaults (the command line wins)."""
    if path is None:
        return
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise InputError(f"{path}: not a readable TOML file: {e}") from e
    layers = data.pop("layer", [])
    defaults: dict[str, Any] = {}
    for key, value in data.items():
        name, value = _option(ctx.command, key, value, path)
        defaults[name] = value
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    ctx.meta[LAYERS_KEY] = tuple(_layer(entry, path) for entry in (layers if isinstance(layers, list) else [layers]))


def layer_overrides() -> tuple[LayerOverride, ...]:
    return tuple(click.get_current_context().meta.get(LAYERS_KEY, ()))


def _option(command: click.Command, key: str, value: Any, path: Path) -> tuple[str, Any]:
    flag = "--" + key.replace("_", "-")
    for p in command.params:
        if isinstance(p, click.Option) and p.name != "config":
            if flag in p.opts:
                return str(p.name), value
            if flag in p.secondary_opts and isinstance(value, bool):  # per-tensor = true -> per_channel = False
                return str(p.name), not value
    raise UsageError(f"{path}: {key!r} is not an option of qconvert {command.name}")


def _layer(entry: Any, path: Path) -> LayerOverride:
    if not isinstance(entry, dict) or "match" not in entry:
        raise UsageError(f'{path}: each [[layer]] needs match = "NAME or GLOB"')
    unknown = set(entry) - LAYER_KEYS
    if unknown:
        raise UsageError(
            f"{path}: [[layer]] {entry['match']!r} has unknown keys {sorted(unknown)} (allowed: {sorted(LAYER_KEYS)})"
        )
    granularity = entry.get("granularity")
    if granularity is not None and granularity not in {g.value for g in Granularity}:
        raise UsageError(f"{path}: [[layer]] {entry['match']!r}: granularity must be per-tensor or per-channel")
    return LayerOverride(
        match=str(entry["match"]),
        bits=entry.get("bits"),
        granularity=Granularity(granularity) if granularity else None,
        skip=bool(entry.get("skip", False)),
        method=entry.get("method"),
    )
