"""What every plot of a report shares: one colour and marker per method, and legends that fit the figure."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import matplotlib

MARKERS = "osD^vP*Xph<>"


def method_styles(methods: Iterable[str]) -> dict[str, dict[str, object]]:
    """One colour and marker per method, the same in every panel (tab10, or tab20 beyond ten methods)."""
    methods = sorted(set(methods))
    cmap = matplotlib.colormaps.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    return {m: {"color": cmap(i % cmap.N), "marker": MARKERS[i % len(MARKERS)]}
            for i, m in enumerate(methods)}


def legend_columns(labels: Sequence[str], width_in: float, fontsize: float) -> int:
    """How many legend columns of these labels fit across a figure `width_in` inches wide (a column is a
    marker and its longest label; a character is taken as 0.62 em, wider than the average one)."""
    char_in = 0.62 * fontsize / 72
    column_in = 0.75 + char_in * max((len(label) for label in labels), default=1)
    return max(1, min(len(labels), int(width_in // column_in)))
