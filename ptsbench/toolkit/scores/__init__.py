"""The score axis: how much each weight of a layer is worth keeping, one registered function per score.

Every score has the same signature, `score(layer, inputs) -> Tensor` in the layer's weight shape (higher
keeps), and says whether it reads calibration statistics: `inputs` carries what a score may read (the
layer's dense input norms, a seeded generator, the score's options). Methods choose a score by name
(`algorithm.score`) and keep their own comparison rule (per layer, per row, N:M groups), so a score is
written once for every method that ranks weights by it, as in jaxpruner's registry of scorers.

Each module of this package registers its scores with `register_score` and is imported on first lookup
(pkgutil), so a new score is a new module here; no list elsewhere names them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from ptsbench.errors import PtsbenchError, unknown_choice
from ptsbench.toolkit.registry import import_modules, register_once
from ptsbench.toolkit.sparsity import PrunableLayer


@dataclass(frozen=True)
class ScoreInputs:
    """What a score may read about one layer beside its weights."""

    # squared L2 norm of each (group, input feature) over the dense network's calibration inputs
    # (`ptsbench.toolkit.layerwise.InputNorms.squares`); given only to scores that need calibration
    squares: torch.Tensor | None = None
    # the job's seeded stream for this score, shared by the layers in module order
    generator: torch.Generator | None = None
    # the score's settings: its registered defaults, overridden by the method's own options
    options: Mapping[str, float] = field(default_factory=dict)


ScoreFunction = Callable[[PrunableLayer, ScoreInputs], torch.Tensor]


@dataclass(frozen=True)
class Score:
    name: str
    function: ScoreFunction
    needs_calibration: bool = False  # reads `ScoreInputs.squares` (one pass of the dense network)
    options: Mapping[str, float] = field(default_factory=dict)  # option names and their defaults

    def __call__(self, layer: PrunableLayer, squares: torch.Tensor | None = None,
                 generator: torch.Generator | None = None,
                 options: Mapping[str, float] | None = None) -> torch.Tensor:
        """The layer's scores; `options` override the registered defaults."""
        if self.needs_calibration and squares is None:
            raise PtsbenchError(f"score {self.name} reads the layer's input norms; none were given.")
        inputs = ScoreInputs(squares, generator, {**self.options, **(options or {})})
        return self.function(layer, inputs)


_REGISTRY: dict[str, Score] = {}


def register_score(name: str, *, needs_calibration: bool = False,
                   options: Mapping[str, float] | None = None) -> Callable[[ScoreFunction], ScoreFunction]:
    """Decorator: register `function` as score `name` (a name may be registered once)."""

    def register(function: ScoreFunction) -> ScoreFunction:
        register_once(_REGISTRY, "score", name, Score(name, function, needs_calibration, dict(options or {})))
        return function

    return register


def available_scores() -> dict[str, Score]:
    """Every registered score, after importing each module of this package."""
    import_modules(__path__, __name__)
    return dict(_REGISTRY)


def get_score(name: str, key: str = "algorithm.score") -> Score:
    """The score registered as `name`; an unknown name is a ConfigError naming `key` and the known ones."""
    scores = available_scores()
    if name not in scores:
        raise unknown_choice(key, name, scores)
    return scores[name]
