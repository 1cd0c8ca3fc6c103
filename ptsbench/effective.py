"""Effective sparsity: which weights can influence the output at all, computed from the network's structure.

A weight counts as *effective* when it is non-zero and lies on a path from the input pixels to the output
through non-zero weights. Zeros are not the only weights a mask removes: a kernel tap that only ever reads
padding (a 3x3 convolution on a 1x1 map), the weights out of a unit whose every incoming weight is pruned,
and the weights into a unit whose every outgoing weight is pruned are all dead, yet an audit that counts
zeros reports them as kept. `dense_dead_fraction` is the same count for the dense model (every weight
non-zero): the weights the input size alone makes useless.

How: one forward and one backward pass of a *positive surrogate* of the model. Every Conv2d/Linear weight is
replaced by its indicator (W != 0, or all ones for the dense count), every other parameter and buffer by
zero. The input is all ones, so zero padding reproduces the taps that only read padding. A constant is a
source too: a unit whose every incoming weight is pruned still outputs its bias, and a normalisation outputs
its shift (BatchNorm in eval: beta - gamma * mean / sqrt(var + eps); LayerNorm and GroupNorm: beta) whatever
its input, so the weights reading such a unit still move the output. Those layers add the indicator of
their non-zero constants to their outputs (`sources`); other constants (class token, position embedding)
are not sources here, which matters only for a unit whose bias is exactly zero. Every op the model calls is
intercepted (`TorchFunctionMode`) and replaced by a surrogate that maps non-negative inputs to non-negative
outputs and has a strictly positive derivative wherever the real op can pass influence: activations become
the identity, max pooling becomes average pooling over the same window (max passes gradient to one element
only), normalisations that mix features (LayerNorm, GroupNorm, softmax, attention) become "own input plus
the mean over the mixed dims", products become sums (a gate or a layer scale may be a non-zero constant in
the real model). After each computing op the values are binarised (`_Binarize`: value > 0, gradient > 0),
which keeps everything in small integers through any depth, so nothing overflows, underflows or cancels.
With no negative number anywhere, a weight's gradient (sum over positions of downstream gradient times
upstream value) is positive exactly when the weight connects a unit the input reaches to a unit that reaches
the output. An op whose surrogate is not known raises `EffectiveSparsityError` instead of guessing.

Conservative by construction: anything on a path counts as effective, whether or not the real values cancel.
Assumptions, stated where they matter: BatchNorm runs in eval mode (per-channel, no mixing), and normalisation
scales are taken as non-zero; attention masks and causality are ignored (every key may reach every query).
"""

from __future__ import annotations

import argparse
import copy
import inspect
import logging
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

from ptsbench.errors import PtsbenchError

log = logging.getLogger(__name__)

DTYPE = torch.float64  # CPU float64 convolutions are plain im2col + GEMM: no Winograd/FFT transforms


class EffectiveSparsityError(PtsbenchError):
    """The model calls an op whose positive surrogate is unknown, so effective sparsity cannot be vouched
    for."""


class _Binarize(torch.autograd.Function):
    """value > 0 forward, gradient > 0 backward: reachability, in {0, 1}, at every depth."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return (grad > 0).to(grad.dtype)


def _binarize(x: torch.Tensor) -> torch.Tensor:
    return _Binarize.apply(x)


def _bind(signature: Callable, args: tuple, kwargs: dict) -> dict:
    """The arguments of a call by name, with defaults, following a Python stand-in signature."""
    bound = inspect.signature(signature).bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


def _mix(x: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """Own input plus the mean over `dims`: every input along `dims` reaches every output along them."""
    dims = [d % x.dim() for d in dims]
    return x + x.mean(dim=dims, keepdim=True) if dims else x


def _is_tensor(x: object) -> bool:
    return isinstance(x, torch.Tensor)


def _path_tensors(args: Iterable, kwargs: Mapping) -> list[torch.Tensor]:
    """Tensors among the arguments (nested one level in lists/tuples) that carry a path (require grad)."""
    found = []
    for a in list(args) + list(kwargs.values()):
        items = a if isinstance(a, (list, tuple)) else (a,)
        found += [t for t in items if _is_tensor(t) and t.requires_grad]
    return found


def _zero_floats(out: object) -> object:
    """A constant result (no path in its inputs): zero, since constants are not paths."""
    if _is_tensor(out) and out.is_floating_point():
        return torch.zeros_like(out)
    if isinstance(out, (list, tuple)) and any(_is_tensor(o) for o in out):
        return type(out)(_zero_floats(o) for o in out) if type(out) in (list, tuple) else out
    return out


# ------------------------------------------------------------------------------------ op surrogates
# Stand-in signatures: argument names and defaults of the real functions, used to read the call.

def _conv2d_sig(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1): ...
def _linear_sig(input, weight, bias=None): ...
def _batch_norm_sig(input, running_mean=None, running_var=None, weight=None, bias=None, training=False,
                    momentum=0.1, eps=1e-5): ...
def _layer_norm_sig(input, normalized_shape, weight=None, bias=None, eps=1e-5): ...
def _group_norm_sig(input, num_groups, weight=None, bias=None, eps=1e-5): ...
def _max_pool2d_sig(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                    return_indices=False): ...
def _adaptive_max_sig(input, output_size, return_indices=False): ...
def _softmax_sig(input, dim=None, _stacklevel=3, dtype=None): ...
def _sdpa_sig(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              enable_gqa=False): ...
def _pad_sig(input, pad, mode="constant", value=None): ...
def _interpolate_sig(input, size=None, scale_factor=None, mode="nearest", align_corners=None,
                     recompute_scale_factor=None, antialias=False): ...


class _Surrogate:
    """Op handlers of the positive surrogate; `weights` holds the indicator leaves conv/linear may use, and
    `sources` the indicator of each layer's non-zero constant output, keyed by the id of the tensor the
    functional op receives (conv/linear: the weight leaf; batch_norm: running_mean; layer/group norm: weight
    or bias)."""

    def __init__(self, weights: Iterable[torch.Tensor], sources: Mapping[int, torch.Tensor] | None = None):
        self.weight_ids = {id(w) for w in weights}
        self.sources = dict(sources or {})

    def _plus_source(self, out: torch.Tensor, key: object, channel_dim: int,
                     trailing: int = 1) -> torch.Tensor:
        """`out` plus the constant source of the layer `key` names, broadcast along `channel_dim` (or, with
        `channel_dim=-1`, over the last `trailing` dims)."""
        src = self.sources.get(id(key)) if key is not None else None
        if src is None:
            return out
        if channel_dim == -1:
            return out + src.reshape(src.shape[-trailing:] if trailing else ())
        shape = [1] * out.dim()
        shape[channel_dim] = -1
        return out + src.reshape(shape)

    def _weight(self, w: torch.Tensor, op: str) -> torch.Tensor:
        if id(w) not in self.weight_ids:
            raise EffectiveSparsityError(
                f"{op} is called with a weight that is not a Conv2d/Linear module's own weight (a computed "
                f"or standardised weight): its surrogate would not follow the mask.")
        return w

    def conv2d(self, func, args, kwargs):
        a = _bind(_conv2d_sig, args, kwargs)
        w = self._weight(a["weight"], "conv2d")
        out = func(a["input"], w, None, a["stride"], a["padding"], a["dilation"], a["groups"])
        return _binarize(self._plus_source(out, w, 1))

    def linear(self, func, args, kwargs):
        a = _bind(_linear_sig, args, kwargs)
        w = self._weight(a["weight"], "linear")
        return _binarize(self._plus_source(func(a["input"], w, None), w, -1))

    def batch_norm(self, func, args, kwargs):
        a = _bind(_batch_norm_sig, args, kwargs)
        x = a["input"]
        # eval: per channel; batch statistics (training, or no running stats) mix batch and positions
        mixes = a["training"] or a["running_mean"] is None
        if mixes:
            return _binarize(_mix(x, [d for d in range(x.dim()) if d != 1]))
        return _binarize(self._plus_source(x, a["running_mean"], 1))

    def layer_norm(self, func, args, kwargs):
        a = _bind(_layer_norm_sig, args, kwargs)
        x = a["input"]
        trailing = len(a["normalized_shape"])
        key = a["weight"] if a["weight"] is not None else a["bias"]
        return _binarize(self._plus_source(_mix(x, list(range(-trailing, 0))), key, -1, trailing))

    def group_norm(self, func, args, kwargs):
        a = _bind(_group_norm_sig, args, kwargs)
        x = a["input"]
        grouped = x.reshape(x.shape[0], int(a["num_groups"]), -1)
        key = a["weight"] if a["weight"] is not None else a["bias"]
        return _binarize(self._plus_source(_mix(grouped, [-1]).reshape(x.shape), key, 1))

    def max_pool2d(self, func, args, kwargs):
        a = _bind(_max_pool2d_sig, args, kwargs)
        if a["return_indices"] or a["dilation"] not in (1, (1, 1), [1, 1]):
            raise EffectiveSparsityError("max_pool2d with return_indices or dilation has no surrogate here.")
        return _binarize(torch.nn.functional.avg_pool2d(a["input"], a["kernel_size"], a["stride"],
                                                        a["padding"], a["ceil_mode"], count_include_pad=True))

    def adaptive_max_pool2d(self, func, args, kwargs):
        a = _bind(_adaptive_max_sig, args, kwargs)
        if a["return_indices"]:
            raise EffectiveSparsityError("adaptive_max_pool2d with return_indices has no surrogate here.")
        return _binarize(torch.nn.functional.adaptive_avg_pool2d(a["input"], a["output_size"]))

    def softmax(self, func, args, kwargs):
        a = _bind(_softmax_sig, args, kwargs)
        if a["dim"] is None:
            raise EffectiveSparsityError("softmax without an explicit dim has no surrogate here.")
        return _binarize(_mix(a["input"], [a["dim"]]))

    def sdpa(self, func, args, kwargs):
        """Attention: a value feature reaches that feature of every query's output; queries and keys reach
        an output feature only through the attention weights, i.e. only where that value feature varies
        over the keys. A value feature no input reaches is a constant over the keys, and a convex
        combination of a constant is that constant whatever the weights: hence value * (1 + query + key)."""
        a = _bind(_sdpa_sig, args, kwargs)
        if a["enable_gqa"]:
            raise EffectiveSparsityError("scaled_dot_product_attention with enable_gqa has no surrogate "
                                         "here.")
        q, k, v = a["query"], a["key"], a["value"]
        out = v.mean(-2, keepdim=True) * (1 + q.mean(-1, keepdim=True) + k.mean((-2, -1), keepdim=True))
        return _binarize(out.expand(*out.shape[:-2], q.shape[-2], v.shape[-1]).contiguous())

    def matmul(self, func, args, kwargs):
        """A product of two path tensors: each entry reaches every output its row/column enters."""
        a, b = args[0], args[1]
        if not (_is_tensor(a) and _is_tensor(b)):
            raise EffectiveSparsityError("matmul with a non-tensor operand has no surrogate here.")
        return _binarize(torch.matmul(a, torch.ones_like(b)) + torch.matmul(torch.ones_like(a), b))

    def sum_of_operands(self, func, args, kwargs):
        """add/sub/mul/div of tensors: every tensor operand reaches the result (a product's other factor
        may be a non-zero constant in the real model); a scalar operand is a constant."""
        tensors = [t for t in args[:2] if _is_tensor(t)]
        name = func.__name__
        if name.endswith("_") or name.startswith("__i"):  # in place: the first operand keeps its storage
            first = args[0]
            for t in tensors[1:]:
                first.add_(t)
            return first
        out = tensors[0]
        for t in tensors[1:]:
            out = out + t
        return _binarize(out)

    def identity(self, func, args, kwargs):
        """Element-wise activations, dropout (eval), clamps: on non-negative inputs the identity passes
        influence wherever the real op can (ReLU6/hardtanh/clamp have zero derivative above the cap)."""
        return _binarize(args[0] if args else kwargs["input"])

    def pad(self, func, args, kwargs):
        a = _bind(_pad_sig, args, kwargs)
        value = None if a["mode"] != "constant" else 0.0  # a constant fill is not a path
        return func(a["input"], a["pad"], a["mode"], value)

    def interpolate(self, func, args, kwargs):
        """Nearest, (bi/tri)linear and area resampling use non-negative weights; bicubic's kernel has negative
        lobes, which could cancel a reached pixel in the surrogate."""
        a = _bind(_interpolate_sig, args, kwargs)
        if a["mode"] not in ("nearest", "nearest-exact", "linear", "bilinear", "trilinear", "area"):
            raise EffectiveSparsityError(f"interpolate mode {a['mode']!r} has no surrogate here.")
        return func(*args, **kwargs)

    def keep(self, func, args, kwargs):
        """Ops that only move or sum non-negative values (shape ops, sums, means, average pooling): exact."""
        return func(*args, **kwargs)


# Ops by name. Unlisted ops raise unless none of their tensor inputs carries a path (then they are constants).
_HANDLERS: dict[str, str] = {
    "conv2d": "conv2d",
    "linear": "linear",
    "batch_norm": "batch_norm",
    "layer_norm": "layer_norm", "rms_norm": "layer_norm",
    "group_norm": "group_norm",
    "max_pool2d": "max_pool2d",
    "adaptive_max_pool2d": "adaptive_max_pool2d",
    "softmax": "softmax", "log_softmax": "softmax",
    "scaled_dot_product_attention": "sdpa",
    "matmul": "matmul", "__matmul__": "matmul", "bmm": "matmul",
    "pad": "pad",
    "interpolate": "interpolate",
}
_HANDLERS.update({n: "sum_of_operands" for n in (
    "add", "add_", "__add__", "__radd__", "__iadd__",
    "sub", "sub_", "__sub__", "__rsub__", "__isub__",
    "mul", "mul_", "__mul__", "__rmul__", "__imul__",
    "div", "div_", "__truediv__", "__itruediv__",
)})
_HANDLERS.update({n: "identity" for n in (
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_", "gelu", "silu",
    "hardswish", "hardsigmoid", "sigmoid", "sigmoid_", "tanh", "elu", "elu_", "selu", "celu", "mish",
    "softplus", "clamp", "clamp_", "clamp_min", "clamp_min_", "clip", "dropout", "dropout1d", "dropout2d",
    "alpha_dropout", "feature_alpha_dropout",
)})
_HANDLERS.update({n: "keep" for n in (
    "reshape", "view", "flatten", "permute", "transpose", "contiguous", "__getitem__", "expand", "expand_as",
    "unsqueeze", "squeeze", "unbind", "split", "chunk", "cat", "concat", "concatenate", "stack", "narrow",
    "select", "repeat", "clone", "flip", "roll", "pixel_shuffle", "pixel_unshuffle", "mean", "sum",
    "avg_pool2d", "adaptive_avg_pool2d", "to", "type_as", "float", "double",
)})
# Metadata or shape-only views reached through attribute access (x.shape, x.T).
_VIEW_ATTRIBUTES = {"T", "mT"}


class _SurrogateMode(TorchFunctionMode):
    def __init__(self, surrogate: _Surrogate):
        super().__init__()
        self.surrogate = surrogate

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", repr(func))
        if name == "__get__":
            attribute = getattr(getattr(func, "__self__", None), "__name__", "")
            out = func(*args, **kwargs)
            if _is_tensor(out) and out.is_floating_point() and attribute not in _VIEW_ATTRIBUTES:
                raise EffectiveSparsityError(f"attribute .{attribute} of a tensor on the path has no "
                                             "surrogate.")
            return out
        if not _path_tensors(args, kwargs):
            return _zero_floats(func(*args, **kwargs))
        handler = _HANDLERS.get(name)
        if handler is None:
            out = func(*args, **kwargs)
            if isinstance(out, (torch.Size, int)) and not isinstance(out, bool):
                return out  # metadata: size(), dim(), numel()
            raise EffectiveSparsityError(
                f"The model calls {name!r} on a tensor that carries the input's influence, and effective "
                f"sparsity has no positive surrogate for it. Known ops: {sorted(_HANDLERS)}.")
        return getattr(self.surrogate, handler)(func, args, kwargs)


# ------------------------------------------------------------------------------------ the computation


def _unparametrize(model: nn.Module) -> None:
    """Bake parametrizations (masks) into plain weights, in the copy only."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for tensor_name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)


def _has_weight(module: nn.Module) -> bool:
    return (isinstance(module, (nn.Conv2d, nn.Linear))
            and isinstance(getattr(module, "weight", None), torch.Tensor))


def _constant_output(module: nn.Module) -> tuple[object, torch.Tensor] | None:
    """(the tensor its functional op receives, the indicator of its non-zero constant output) for a layer that
    outputs a constant whatever its input is: a bias, a normalisation's shift."""
    if _has_weight(module) and getattr(module, "bias", None) is not None:
        return None  # keyed by the weight leaf, which replaces the weight below
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
        gamma = module.weight if module.weight is not None else torch.ones_like(module.running_mean)
        beta = module.bias if module.bias is not None else torch.zeros_like(module.running_mean)
        shift = beta - gamma * module.running_mean / torch.sqrt(module.running_var + module.eps)
        return module.running_mean, (shift != 0).to(DTYPE)
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)) and getattr(module, "bias", None) is not None:
        return (module.weight if module.weight is not None else module.bias), (module.bias != 0).to(DTYPE)
    return None


def _surrogate_model(model: nn.Module, dense: bool
                     ) -> tuple[nn.Module, dict[str, nn.Parameter], dict[int, torch.Tensor]]:
    """A CPU float64 copy: Conv2d/Linear weights as indicator leaves, every other parameter and buffer zero;
    and the constant sources (`_Surrogate.sources`), read before the zeroing."""
    copy_ = copy.deepcopy(model)
    _unparametrize(copy_)
    copy_ = copy_.to(device="cpu", dtype=DTYPE).eval()
    indicators: dict[str, nn.Parameter] = {}
    sources: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for name, module in copy_.named_modules():
            constant = _constant_output(module)
            if constant is not None:
                sources[id(constant[0])] = constant[1]
            if _has_weight(module):
                w = module.weight
                indicators[name] = nn.Parameter(torch.ones_like(w) if dense else (w != 0).to(DTYPE))
                module.weight = indicators[name]
                if getattr(module, "bias", None) is not None:
                    sources[id(indicators[name])] = (module.bias != 0).to(DTYPE)
        leaves = {id(p) for p in indicators.values()}
        for p in copy_.parameters():
            if id(p) not in leaves:
                p.zero_()
                p.requires_grad_(False)
        for b in copy_.buffers():
            if b.is_floating_point():
                b.zero_()
    return copy_, indicators, sources


def _output_sum(out: object) -> torch.Tensor:
    """Sum of every floating tensor in the output (a tensor, or a tuple/list/dict of them)."""
    if _is_tensor(out):
        return out.sum() if out.is_floating_point() else torch.zeros((), dtype=DTYPE)
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return sum((_output_sum(o) for o in out), torch.zeros((), dtype=DTYPE))
    raise EffectiveSparsityError(f"The model returned a {type(out).__name__}, not tensors.")


def reachable_weights(model: nn.Module, input_shape: Sequence[int],
                      dense: bool = False) -> dict[str, torch.Tensor]:
    """Per Conv2d/Linear module name: a bool tensor, True where the weight can influence the output.

    `dense=True` treats every weight as non-zero (what the input size alone leaves alive).
    """
    with torch.inference_mode(False), torch.enable_grad():  # callers may evaluate under inference mode
        surrogate, indicators, sources = _surrogate_model(model, dense)
        x = torch.ones(tuple(int(s) for s in input_shape), dtype=DTYPE, requires_grad=True)
        with _SurrogateMode(_Surrogate(indicators.values(), sources)):
            out = surrogate(x)
        total = _output_sum(out)
        names = list(indicators)
        if not total.requires_grad:  # nothing reaches the output
            return {n: torch.zeros_like(indicators[n], dtype=torch.bool) for n in names}
        grads = torch.autograd.grad(total, [indicators[n] for n in names], allow_unused=True)
    return {n: (indicators[n] > 0) & (g > 0) if g is not None
            else torch.zeros_like(indicators[n], dtype=torch.bool)
            for n, g in zip(names, grads, strict=True)}


@dataclass
class LayerReach:
    """Per weight tensor: how many weights the input size alone kills, and how many can influence the
    output."""

    params: int
    dense_dead: int
    effective: int

    @property
    def dense_dead_fraction(self) -> float:
        return self.dense_dead / self.params

    @property
    def effective_sparsity(self) -> float:
        return 1.0 - self.effective / self.params


def layer_reach(model: nn.Module, layer_names: Sequence[str],
                input_shape: Sequence[int]) -> dict[str, LayerReach]:
    """Dense-dead and effective counts for the named Conv2d/Linear modules (two surrogate passes)."""
    dense = reachable_weights(model, input_shape, dense=True)
    actual = reachable_weights(model, input_shape, dense=False)
    missing = [n for n in layer_names if n not in actual]
    if missing:
        raise EffectiveSparsityError(f"Layers {missing[:5]} are not Conv2d/Linear modules of the model.")
    return {n: LayerReach(actual[n].numel(), int((~dense[n]).sum()),
                          int(actual[n].sum())) for n in layer_names}


# ------------------------------------------------------------------------------------ command


def dense_dead_table(model: nn.Module, layers: Sequence, input_shape: Sequence[int]) -> pd.DataFrame:
    """dense_dead_fraction per layer kind and in total (`layers`: PrunableLayer list)."""
    dead = reachable_weights(model, input_shape, dense=True)
    rows = pd.DataFrame([{"kind": ly.kind, "params": ly.numel,
                          "dead": int((~dead[ly.name]).sum())} for ly in layers])
    table = rows.groupby("kind", sort=True)[["params", "dead"]].sum()
    table.loc["total"] = table.sum()
    table["dense_dead_fraction"] = table["dead"] / table["params"]
    return table.reset_index()


def main(argv: list[str] | None = None) -> None:
    """`python -m ptsbench.effective model=<cfg> [overrides]`: the dense model's dead weights at its input
    size."""
    from ptsbench.config import compose_job_config
    from ptsbench.dense import build_model, load_data
    from ptsbench.toolkit.sparsity import PrunePolicy, find_prunable_layers

    parser = argparse.ArgumentParser(prog="python -m ptsbench.effective", description=main.__doc__)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=resnet18 model.img_size=28")
    cfg = compose_job_config(parser.parse_args(argv).overrides)
    data = load_data(cfg, Path(str(cfg.cache_dir)).expanduser())
    model = build_model(cfg, data)
    layers = find_prunable_layers(model, PrunePolicy.from_config(cfg.prune_policy))
    shape = (1, data.spec.in_chans, data.spec.img_size, data.spec.img_size)
    start = time.perf_counter()
    table = dense_dead_table(model, layers, shape)
    seconds = time.perf_counter() - start
    print(f"{cfg.model.name} at {shape[1]}x{shape[2]}x{shape[3]} (computed in {seconds:.2f} s)")
    print(table.to_markdown(index=False, floatfmt=".4f"))


if __name__ == "__main__":
    main(sys.argv[1:])
