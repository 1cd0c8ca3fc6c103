"""Optional torch.compile of weight-sized elementwise chains (the job's `compile` key).

A method that builds a mask, a count or a straight-through gradient from every weight on every step runs
several full passes over the weights in eager mode (|w|, the comparison, the cast, the product, and as
many again backward); compiled, each chain is one fused loop. Elementwise results are the same bits;
reductions (a threshold's gradient summed over a layer) may round differently, which is why `compile` is
an execution setting like the thread count and off by default.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)


class MaybeCompiled:
    """`fn`, compiled on first use when `enabled`; if compilation fails (no C++ compiler on CPU, no Triton on
    CUDA) it warns once and runs `fn` eagerly from then on. A failure surfaces before the compiled code
    runs, so retrying eagerly repeats no side effect."""

    def __init__(self, fn: Callable[..., Any], enabled: bool):
        self.fn = fn
        self.compiled = torch.compile(fn, dynamic=True) if enabled else None
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any) -> Any:
        if self.compiled is None:
            return self.fn(*args)
        try:
            # layers differ in shape: without this, weights (parameters) get static shapes and every layer
            # would be compiled anew until the recompile limit falls back to eager
            with torch._dynamo.config.patch(force_parameter_static_shapes=False):
                return self.compiled(*args)
        except Exception as exc:  # torch raises backend-specific types (BackendCompilerFailed, InductorError)
            log.warning("compile=true: torch.compile of %s failed (%s: %s); running it eagerly.",
                        self.fn.__name__, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            self.compiled = None
            return self.fn(*args)


@functools.cache
def maybe_compiled(fn: Callable[..., Any], enabled: bool) -> MaybeCompiled:
    """One wrapper per (function, flag), so all layers of a job share one compiled function and its cache."""
    return MaybeCompiled(fn, enabled)
