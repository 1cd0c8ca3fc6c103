"""Settings dataclasses: the one home of an algorithm's hyperparameters.

A method's hyperparameters come in groups (UniPTS's search, objective and training; the reconstruction
that magnitude pruning and POT share; the allocation axis and DSnoT's refinement that the one-shot and
score methods share). Each group is one frozen dataclass, and every method has one more for its whole
`algorithm` node (its `settings` class), whose fields are its top-level keys and its groups (`node(...)`).
The dataclass holds every default with its type and its allowed values; `ptsbench.config.register_configs`
stores its defaults in Hydra's ConfigStore (`schema/algorithm/<name>`, `Settings.schema`), which the
method's yaml presets start from, so a preset writes only the values it changes. `Settings.read` turns a
config node into the dataclass and fails before any work on an unknown key or a value out of range,
naming the dotted key.

`Settings.options()` (what records and tables show of a run) is derived from the fields: every field under
its own name, nested nodes flattened into the same dict (their fields keep their own names, without the
node's), except where a field's `option(record=...)` says otherwise: `record=False` leaves it out (speed
knobs, fixed recipe constants), `record="name"` renames it, `when=` records it only where the predicate
on its node holds, `shown=` transforms the value. The names are those the committed records have always
used (tests/fixtures/algorithm_configs.json pins them)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ptsbench.errors import ConfigError, unknown_choice, unknown_key


@dataclass(frozen=True)
class Range:
    """The allowed values of one numeric option, phrased the way the error message shows them."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # `low` itself is not allowed
    high_open: bool = False  # `high` itself is not allowed
    whole: bool = False  # a whole number
    nullable: bool = False  # null means "not set" (no limit, torch's default ...)

    def allows(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.whole and value != int(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))

    def describe(self) -> str:
        kind = "a whole number" if self.whole else "a number"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            text = f"{kind} in {left}{self.low:g}, {self.high:g}{right}"
        elif self.low is not None:
            text = f"{kind} {'>' if self.low_open else '>='} {self.low:g}"
        elif self.high is not None:
            text = f"{kind} {'<' if self.high_open else '<='} {self.high:g}"
        else:
            text = f"a finite {kind[2:]}"
        return text + (" or null" if self.nullable else "")

    def check(self, key: str, value: Any) -> None:
        if not self.allows(value):
            raise ConfigError(f"{key}={value!r} is not allowed: it must be {self.describe()}.")


COUNT = Range(1, whole=True)  # a number of images, steps, threads, a batch size
OPTIONAL_COUNT = Range(1, whole=True, nullable=True)
NON_NEGATIVE_COUNT = Range(0, whole=True)
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, low_open=True)
OPTIONAL_POSITIVE = Range(0, low_open=True, nullable=True)
PROBABILITY = Range(0, 1)
FRACTION = Range(0, 1, low_open=True, high_open=True)


Check = Callable[[str, Any], None]  # a checker of its own: (dotted key, value), raising ConfigError


def option(default: Any, allowed: Range | tuple[Any, ...] | Check | None = None, *, record: bool | str = True,
           when: Callable[[Any], bool] | None = None, shown: Callable[[Any], Any] | None = None,
           schema: bool = True) -> Any:
    """A settings field: its default and what it allows (a Range, a tuple of choices or a checker), and how
    `options()` records it: under its name (`record=True`), another name (`record="name"`) or not at all
    (`record=False`); only where `when(node)` holds; as `shown(value)`. `schema=False`: a key the composed
    node holds only where a preset or the command line gives it (see `Settings.schema`)."""
    metadata = {"allowed": allowed, "record": record, "when": when, "shown": shown, "schema": schema}
    return field(default=default, metadata=metadata)


def node(cls: type[Settings], default: Settings | None = None, *,
         when: Callable[[Any], bool] | None = None, optional: bool = False) -> Any:
    """A nested settings node (`optimization:` in the yaml): its defaults are `default` or `cls()`'s; a
    mapping given for it changes only the keys it names. Its options join the parent's (where `when(parent)`
    holds). An `optional` node is None unless given (OWL's settings exist only with OWL's allocation), and
    is not in the schema."""
    if optional:
        return field(default=None, metadata={"settings": cls, "record": True, "when": when, "schema": False})
    base = default if default is not None else cls()
    return field(default_factory=lambda: base, metadata={"settings": cls, "record": True, "when": when})


S = TypeVar("S", bound="Settings")


@dataclass(frozen=True)
class Settings:
    """Base of every settings node: read from a config mapping, checked, and listed as options."""

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every key of the node with its default, nested nodes as mappings (the ConfigStore schema node)."""
        return dataclasses.asdict(cls())

    @classmethod
    def schema(cls) -> dict[str, Any]:
        """The ConfigStore's node (`schema/algorithm/<name>`): every key with its default, except the keys a
        config holds only when it sets them (`schema=False`). Those stay out so that a preset composes the
        same node, hence the same job `config_hash`, as when its yaml listed the keys itself."""
        defaults = cls.defaults()
        return {f.name: defaults[f.name] for f in dataclasses.fields(cls) if f.metadata.get("schema", True)}

    @classmethod
    def read(cls: type[S], node: Mapping[str, Any] | S | None, key: str, base: S | None = None) -> S:
        """The node as this dataclass; `key` (e.g. 'algorithm.search') names it in error messages. Keys the
        node leaves out keep `base`'s values (the defaults when no base is given)."""
        if isinstance(node, cls):
            return node.check(key)
        if node is None:
            node = {}
        if not isinstance(node, Mapping):
            raise ConfigError(f"{key}={node!r} must be a mapping with the keys "
                              f"{', '.join(cls.field_names())}.")
        unknown = [k for k in node if k not in cls.field_names()]
        if unknown:
            others = (f"Also unknown: {', '.join(f'{key}.{k}' for k in unknown[1:])}."
                      if len(unknown) > 1 else "")
            raise unknown_key(f"{key}.{unknown[0]}", f"{key} ({cls.__name__})", cls.field_names(),
                              hint=others)
        base = base if base is not None else cls()
        values = dict(node)
        for f in dataclasses.fields(cls):
            nested = f.metadata.get("settings")
            if nested is not None and f.name in values and values[f.name] is not None:
                values[f.name] = nested.read(values[f.name], f"{key}.{f.name}", getattr(base, f.name))
        return dataclasses.replace(base, **values).check(key)

    def check(self: S, key: str) -> S:
        for f in dataclasses.fields(self):
            allowed, value = f.metadata.get("allowed"), getattr(self, f.name)
            if isinstance(value, Settings):
                value.check(f"{key}.{f.name}")
            elif isinstance(allowed, Range):
                allowed.check(f"{key}.{f.name}", value)
            elif isinstance(allowed, tuple):
                if value not in allowed:
                    raise unknown_choice(f"{key}.{f.name}", value, [str(a) for a in allowed])
            elif allowed is not None:
                allowed(f"{key}.{f.name}", value)
        self.check_together(key)
        return self

    def check_together(self, key: str) -> None:
        """Constraints between fields (a subclass raises ConfigError naming `key`)."""
        return None

    def options(self) -> dict[str, Any]:
        """The recorded fields as JSON-able options for records and tables (see the module docstring)."""
        opts: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            record, when, shown = (f.metadata.get(k) for k in ("record", "when", "shown"))
            if record is False or (when is not None and not when(self)):
                continue
            value = getattr(self, f.name)
            if value is None and f.metadata.get("settings") is not None:  # an optional node not given
                continue
            if isinstance(value, Settings):
                opts.update(value.options())
            else:
                opts[record if isinstance(record, str) else f.name] = shown(value) if shown else value
        return opts

    def replace(self: S, **changes: Any) -> S:
        return dataclasses.replace(self, **changes)


def settings_type(annotation: Any) -> type[Settings] | None:
    """The Settings subclass named by a constructor annotation (`SearchSettings | Mapping | None`), if any."""
    candidates = getattr(annotation, "__args__", None) or (annotation,)
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, Settings):
            return candidate
    return None


BUDGET = Range(0, low_open=True)


def read_budget(budget: Any, key: str = "algorithm.budget") -> float:
    """`algorithm.budget`: a factor on the preset's step, epoch and generation counts ('reference' = 1)."""
    if isinstance(budget, str) and budget == "reference":
        return 1.0
    BUDGET.check(key, budget)
    return float(budget)


def count_text(count: float) -> str:
    """A count for a message: 64,000,000,000 in full, 2e+302 once no digit of it means anything."""
    return f"{count:,.0f}" if count < 1e15 else f"{count:.3g}"


def scaled(count: int, budget: float, minimum: int = 1) -> int:
    """A count of steps, epochs or generations times the budget factor, never below `minimum`."""
    if count == 0 or budget == 1.0:  # a stage switched off stays off
        return count
    if not math.isfinite(count * budget):
        raise ConfigError(f"algorithm.budget={budget:g} times the preset's {count:,} steps is not a finite "
                          "number; algorithm.budget is a factor on the preset's steps, epochs and "
                          "generations.")
    return max(minimum, round(count * budget))


def check_budget(key: str, budget: Any) -> None:
    read_budget(budget, key)


def budget_option() -> Any:
    """The `budget` key of a method with a budget knob: 1.0 (= 'reference') or another positive factor on
    its preset's counts. Not recorded as given: each method records what the factor made of its budget."""
    return option(1.0, check_budget, record=False)
