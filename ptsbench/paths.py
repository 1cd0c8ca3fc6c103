"""Output and cache paths: created with their parents, and never allowed to escape their root through
`..` components or symbolic links (names inside them come from configs and model names)."""

from __future__ import annotations

from pathlib import Path

from ptsbench.errors import ConfigError


def safe_child(root: Path, *parts: str) -> Path:
    """`root / parts...`, checked to stay inside `root` once links are resolved."""
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    real_root = root.resolve()
    for part in parts:
        if not part or Path(part).is_absolute() or any(p == ".." for p in Path(part).parts):
            raise ConfigError(f"Refusing path component {part!r} under {root}: it would leave that folder.")
    path = root.joinpath(*parts)
    real = path.resolve()
    if real != real_root and real_root not in real.parents:
        raise ConfigError(f"{path} resolves to {real}, outside {real_root}; refusing to write there.")
    return path


def safe_subdir(root: Path, *parts: str) -> Path:
    path = safe_child(root, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
