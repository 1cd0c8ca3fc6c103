"""What the toolkit's registries (scores/, allocations/) share: one entry per name, and discovery of the
modules of a registry package, each of which registers its entries as it is imported."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable, MutableMapping
from typing import Any

from ptsbench.errors import PtsbenchError


def register_once(registry: MutableMapping[str, Any], kind: str, name: str, entry: Any) -> None:
    """Add `entry` (which has a `function`) as `name`. Importing a module twice registers the same
    function again, which is allowed; another function under a taken name is an error naming both."""
    if name in registry and registry[name].function is not entry.function:
        first = registry[name].function.__module__
        raise PtsbenchError(f"{kind} {name!r} is registered twice ({first} and {entry.function.__module__}); "
                            "give one of them another name.")
    registry[name] = entry


def import_modules(path: Iterable[str], package: str) -> None:
    """Import every module of the package at `path` (its `__path__`), so that each registers itself."""
    for module in pkgutil.iter_modules(path, prefix=f"{package}."):
        importlib.import_module(module.name)
