"""User-facing errors: one readable paragraph naming the bad value and what is allowed."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PtsbenchError(Exception):
    """An error caused by the user's input (config, paths, files), reported without a deep stack trace."""


class ConfigError(PtsbenchError):
    """A config value is invalid."""


class DataError(PtsbenchError):
    """A dataset is missing or malformed."""


class CheckpointError(PtsbenchError):
    """A checkpoint is missing, unreadable, or does not match the model."""


class ResultsError(PtsbenchError):
    """A result or record file (result.json, a study's records.jsonl) cannot be read."""


class FolderTaken(ConfigError):
    """A job's folder already belongs to another job (another config hash)."""


class NonFiniteError(PtsbenchError):
    """A weight, a statistic or an output became NaN or infinite: the job stops rather than report garbage."""


class NonFiniteLossError(NonFiniteError):
    """An algorithm's loss became NaN or infinite."""


def _allowed_text(value: object, allowed: Iterable[str], hint: str) -> str:
    """' Allowed: a, b, c. Did you mean: b? hint' for the tail of an unknown-name error."""
    allowed = sorted(allowed)
    close = difflib.get_close_matches(str(value), allowed, n=3, cutoff=0.5)
    listing = (", ".join(allowed) if len(allowed) <= 30
               else ", ".join(allowed[:30]) + f", ... ({len(allowed)} in all)")
    msg = f" Allowed: {listing}."
    if close:
        msg += f" Did you mean: {', '.join(close)}?"
    if hint:
        msg += f" {hint}"
    return msg


def unknown_choice(what: str, value: object, allowed: Iterable[str], hint: str = "") -> ConfigError:
    """Build the error for a value outside a known set, with the closest matches first."""
    return ConfigError(f"Unknown {what} {value!r}." + _allowed_text(value, allowed, hint))


def unknown_key(key: str, owner: str, allowed: Iterable[str], hint: str = "") -> ConfigError:
    """Build the error for a config key that `owner` (a config node or a constructor) does not take."""
    name = key.rpartition(".")[2]
    return ConfigError(f"Unknown config key {key!r}: {owner} has no option {name!r}."
                       + _allowed_text(name, allowed, hint))


def ensure_finite(value: float, what: str, step: int | None = None) -> float:
    """Stop an algorithm whose loss became NaN or infinite instead of training through it."""
    import math

    if not math.isfinite(value):
        where = f" at step {step}" if step is not None else ""
        raise NonFiniteLossError(f"{what} became {value}{where}; the job stops instead of training on "
                                 "garbage.")
    return value
