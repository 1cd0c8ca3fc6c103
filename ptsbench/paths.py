"""Output and cache paths: created with their parents, and never allowed to escape their root through
`..` components or symbolic links (names inside them come from configs and model names)."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from ptsbench.errors import ConfigError

PROBE_BYTES = 1 << 16  # about what a job writes first (.hydra, the identity file, the calibration indices)


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


def why_unwritable(exc: OSError) -> str:
    """The reason behind a failed folder creation or write, in words."""
    reasons = {
        errno.EEXIST: "a file, not a folder, is already at that path",
        errno.ENOTDIR: "a file, not a folder, is in the way on that path",
        errno.ENAMETOOLONG: "a name on that path is longer than the file system allows",
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is used up",
        errno.EACCES: "there is no permission to write there",
        errno.EPERM: "there is no permission to write there",
        errno.EROFS: "the file system is read-only",
    }
    return f"{reasons.get(exc.errno, 'the system refused it')} ({exc.strerror or exc})"


def check_output_dir(path: str | Path, key: str) -> Path:
    """Create the output folder `path` with its parents and write a small file in it: a path that is a file,
    a name too long, a full disk or a read-only place is a ConfigError naming `key`, before any job runs."""
    folder = Path(path).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder) as probe:
            probe.write(b"\0" * PROBE_BYTES)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        raise ConfigError(f"{key}={str(path)!r} cannot hold the job's files: {why_unwritable(exc)}. "
                          f"Set {key} to a folder that can be created and written.") from None
    return folder
