"""Magnitude PTS: each layer's smallest |w| removed at the allocation's count, the baseline every PTS paper
starts from; with `allocation=global_l2norm` it is POT's mask selection without POT's corrections.

The options (allocation, pattern, reconstruction, OWL, DSnoT, BatchNorm) are those of `algorithms.scored`;
`algorithm.score` swaps |w| for another score of `ptsbench.toolkit.scores`.
"""

from __future__ import annotations

from algorithms.scored import ScorePruning


class MagnitudePruning(ScorePruning):
    name = "magnitude"
    default_score = "magnitude"
