"""BatchNorm folding for post-training methods that work on conv + bias (POT, bias correction).

A BatchNorm that directly follows a convolution is an affine map per output channel in inference
mode, so it can be folded into the convolution: W' = W * g / sqrt(v + eps), b' = beta + (b - mu) * g /
sqrt(v + eps). Pairs are found by running one batch and matching tensors (a BN whose input is exactly a
conv's output), not from per-model module names, so it works for any timm CNN.

The model keeps its module structure: the folded BN becomes a pure bias carrier (running mean 0,
running variance 1 - eps, weight 1, bias b'), so the sparse model still loads into the timm
architecture, its checkpoint keys do not change, and the conv weights hold the folded values that
allocation and pruning see. timm's BatchNormAct2d keeps applying its activation after the carrier.
A carrier is only exact in inference mode: re-estimating its statistics afterwards would undo the fold.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@dataclass(frozen=True)
class FoldedPair:
    conv: str  # module name of the convolution
    bn: str  # module name of the BatchNorm folded into it


@torch.no_grad()
def find_conv_bn_pairs(model: nn.Module, example: torch.Tensor) -> list[FoldedPair]:
    """(conv, bn) pairs where the BN's input is exactly the conv's output tensor in one forward pass.

    A conv output used by anything else besides its BN (rare; none in timm's ResNets, MobileNets,
    EfficientNets or RegNets) would see the folded values too, so such convs must not be folded: the
    check below counts how many modules consume each conv output and skips shared ones.
    """
    produced: dict[int, tuple[str, torch.Tensor]] = {}  # the tensor is held so its id is not reused
    consumers: dict[int, list[str]] = {}
    handles = []

    def conv_hook(name):
        def hook(_module, _inputs, output):
            produced[id(output)] = (name, output)
        return hook

    def any_hook(name):
        def hook(_module, inputs):
            for x in inputs:
                if isinstance(x, torch.Tensor) and id(x) in produced:
                    consumers.setdefault(id(x), []).append(name)
        return hook

    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children()) or isinstance(m, _BatchNorm)]
    for name, module in leaves:
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook(name)))
        handles.append(module.register_forward_pre_hook(any_hook(name)))
    was_training = model.training
    model.eval()
    try:
        model(example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    modules = dict(model.named_modules())
    pairs = []
    for tensor_id, names in consumers.items():
        if len(names) == 1 and isinstance(modules[names[0]], _BatchNorm):
            bn = modules[names[0]]
            if bn.affine and bn.track_running_stats and bn.running_mean is not None:
                pairs.append(FoldedPair(produced[tensor_id][0], names[0]))
    order = {name: i for i, name in enumerate(modules)}
    return sorted(pairs, key=lambda p: order[p.conv])


@torch.no_grad()
def fold_batchnorm(model: nn.Module, pairs: list[FoldedPair]) -> dict[str, nn.Module]:
    """Fold each pair's BN into its conv in place; returns {conv name: its bias-carrier BN}."""
    carriers = {}
    for pair in pairs:
        conv = model.get_submodule(pair.conv)
        bn = model.get_submodule(pair.bn)
        if not bn.affine:
            raise ValueError(f"BatchNorm {pair.bn} has no affine parameters to carry the folded bias.")
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias.clone()
        conv_bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.weight.mul_(scale.view(-1, *([1] * (conv.weight.dim() - 1))))
        new_bias = shift + (conv_bias - bn.running_mean) * scale
        if conv.bias is not None:
            conv.bias.zero_()
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - bn.eps)
        bn.weight.fill_(1.0)
        bn.bias.copy_(new_bias)
        carriers[pair.conv] = bn
    return carriers
