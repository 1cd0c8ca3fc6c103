"""PTS algorithms, one module per method, all behind the small interface in `algorithms.base`."""

from algorithms.base import PruneContext, PruneResult, PTSAlgorithm

__all__ = ["PTSAlgorithm", "PruneContext", "PruneResult"]
