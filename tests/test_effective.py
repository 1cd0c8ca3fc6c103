"""Effective sparsity: dead weights counted by hand, the issue's equivalence test on real timm models (zeroing
every weight counted ineffective leaves the output unchanged), and the audit's new fields."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

from ptsbench.audit import audit_model
from ptsbench.effective import EffectiveSparsityError, reachable_weights
from ptsbench.toolkit.sparsity import find_prunable_layers

# ------------------------------------------------------------------------------------ counted by hand


def dead(model: nn.Module, shape: tuple[int, ...]) -> dict[str, int]:
    return {n: int((~m).sum()) for n, m in reachable_weights(model, shape, dense=True).items()}


def test_dead_taps_of_small_convs():
    # 3x3, padding 1, on a 1x1 map: only the centre tap sees the pixel
    assert dead(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1)), (1, 2, 1, 1)) == {"0": 3 * 2 * 8}
    # padding 2 on a 1x1 map: the 3x3 output puts every tap on the pixel once
    assert dead(nn.Sequential(nn.Conv2d(1, 1, 3, padding=2)), (1, 1, 1, 1)) == {"0": 0}
    # stride 2, padding 1 on 2x2: the single output reads rows/cols -1..1, so tap row 0 and col 0 are dead
    assert dead(nn.Sequential(nn.Conv2d(1, 1, 3, stride=2, padding=1)), (1, 1, 2, 2)) == {"0": 5}
    # stride 2, padding 1 on 4x4: outputs read rows -1..1 and 1..3, every tap sees a pixel
    assert dead(nn.Sequential(nn.Conv2d(1, 1, 3, stride=2, padding=1)), (1, 1, 4, 4)) == {"0": 0}
    # a dead tap kills nothing downstream: the linear layer behind it still sees every channel
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
                        nn.Flatten(), nn.Linear(4, 2))
    assert dead(net, (1, 1, 1, 1)) == {"0": 4 * 8, "4": 0}


def test_units_cut_off_by_the_mask():
    net = nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU(), nn.Linear(4, 2)).double()
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[2].weight.fill_(1.0)
        net[0].weight[0] = 0.0  # unit 0 has no input: its outgoing weights (column 0) are dead
        net[2].weight[:, 1] = 0.0  # unit 1 has no output: its incoming weights (row 1) are dead
        net[2].weight[0, 2] = 0.0  # a single zero: unit 2 still reaches output 1
    alive = reachable_weights(net, (1, 3))
    assert alive["0"].sum() == 12 - 3 - 3  # row 0 zero, row 1 cut off
    assert alive["2"].sum() == 8 - 2 - 2 - 1  # column 1 zero, column 0 cut off, one zero
    assert not alive["2"][:, 0].any() and not alive["0"][1].any() and bool(alive["0"][2].all())
    # with a bias, unit 0 emits a constant: a source, so the weights reading it still move the output
    net[0].bias = nn.Parameter(torch.tensor([0.5, 0.0, 0.0, 0.0], dtype=torch.float64))
    alive = reachable_weights(net, (1, 3))
    assert alive["2"][:, 0].tolist() == [True, True] and alive["2"].sum() == 8 - 2 - 1


class Gate(nn.Module):
    """Squeeze-excitation style x * sigmoid(fc(pool(x))): with fc fully pruned the gate is a non-zero constant
    in the real model, so x still passes and the convolution before it stays effective."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.fc = nn.Linear(2, 2)
        self.head = nn.Linear(2, 1)

    def forward(self, x):
        y = self.conv(x)
        g = torch.sigmoid(self.fc(y.mean((2, 3))))
        return self.head((y * g[:, :, None, None]).mean((2, 3)))


def test_a_constant_gate_does_not_block():
    net = Gate()
    with torch.no_grad():
        net.fc.weight.zero_()
    alive = reachable_weights(net, (1, 1, 4, 4))
    assert alive["conv"].all() and alive["head"].all() and not alive["fc"].any()


class Exp(nn.Module):
    def forward(self, x):
        return torch.exp(x).sum()


def test_an_op_without_a_surrogate_fails_loudly():
    with pytest.raises(EffectiveSparsityError, match="'exp'"):
        reachable_weights(nn.Sequential(nn.Linear(2, 2), Exp()), (1, 2))


def test_resnet18_at_28px_matches_the_shapes():
    """layer4 runs on 1x1 maps: 8 of 9 taps dead, 5 of 9 for its strided first conv (2x2 -> 1x1)."""
    model = timm.create_model("resnet18", num_classes=10, in_chans=1)
    sizes = {ly.name: ly.numel for ly in find_prunable_layers(model)}
    at28 = dead(model, (1, 1, 28, 28))
    expected = {"layer4.0.conv1": 5 / 9, "layer4.0.conv2": 8 / 9, "layer4.1.conv1": 8 / 9,
                "layer4.1.conv2": 8 / 9}
    assert {n: at28[n] / p for n, p in sizes.items()} == \
        pytest.approx({n: expected.get(n, 0.0) for n in sizes})
    assert sum(at28.values()) == 512 * 256 * 5 + 3 * 512 * 512 * 8  # 6,946,816 of 11,165,760
    assert sum(dead(model, (1, 1, 56, 56)).values()) == 0  # layer4 on 2x2 maps: every tap sees a pixel


def test_command_prints_the_dense_dead_fraction(require_fmnist, tmp_path, monkeypatch, capsys):
    from ptsbench.effective import main
    monkeypatch.setenv("PTSBENCH_CACHE", str(tmp_path))
    main(["model=resnet18", "model.img_size=28"])
    out = capsys.readouterr().out
    assert "resnet18 at 1x28x28" in out
    assert "| total " in out and "6946816" in out and "0.6222" in out


# --------------------------------------------------------------------------------- equivalence on real models


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def prune_and_cut(model: nn.Module, seed: int) -> None:
    """Magnitude masks at 50% per layer, then in every layer all incoming weights of an eighth of its output
    units zeroed (rows) and all outgoing weights of an eighth of its input units (columns): units cut off
    from the input or from the output, whose other weights an audit of zeros counts as kept."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in weight_layers(model).values():
            w = module.weight
            w[w.abs() <= w.abs().flatten().kthvalue(max(1, w.numel() // 2)).values] = 0
            for dim in (0, 1):
                if w.shape[dim] >= 8:
                    w.index_fill_(dim, torch.randperm(w.shape[dim], generator=g)[: w.shape[dim] // 8], 0.0)


def zero_constants(model: nn.Module) -> None:
    """Biases, normalisation shifts, class token and position embedding to zero: constants, not paths."""
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("bias", "running_mean", "cls_token", "pos_embed", "reg_token"):
                tensor.zero_()


def randomise_norms(model: nn.Module, seed: int) -> None:
    """Non-trivial BN statistics and scales, so normalisation is not the identity it is at initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)


CASES = {
    "resnet18": ("resnet18", {}, 28),
    "mobilenetv2": ("mobilenetv2_100", {}, 56),
    "vit_fused": ("vit_tiny_patch16_224", {"patch_size": 7, "img_size": 28}, 28),
    "vit_unfused": ("vit_tiny_patch16_224", {"patch_size": 7, "img_size": 28}, 28),
}


@pytest.mark.parametrize("case", list(CASES))
def test_ineffective_weights_do_not_change_the_output(case):
    name, kwargs, size = CASES[case]
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, in_chans=1, **kwargs).eval().double()
    if case == "vit_unfused":  # the explicit q @ k^T, softmax, @ v path
        for block in model.blocks:
            block.attn.fused_attn = False
    randomise_norms(model, 1)
    prune_and_cut(model, 2)
    shape = (1, 1, size, size)
    alive = reachable_weights(model, shape)
    layers = weight_layers(model)
    total = sum(m.weight.numel() for m in layers.values())
    zeros = sum(int((m.weight == 0).sum()) for m in layers.values())
    ineffective = total - sum(int(a.sum()) for a in alive.values())
    assert ineffective > zeros + 0.01 * total  # the cut units are found, so the test is not vacuous

    x = torch.randn(4, 1, size, size, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    lively = _lively_copy(model, x)
    zero_constants(model)
    cleared = _copy_without(model, alive)
    with torch.no_grad():
        reference = model(x)
        assert torch.allclose(cleared(x), reference, rtol=0, atol=1e-5)
        assert reference.abs().max() > 1e-3  # the network still computes something
    matters = _matters(lively, alive, x[:2])
    assert sum(matters) >= len(matters) - 1, matters


def _sampled(alive: dict[str, torch.Tensor]) -> list[str]:
    return list(alive)[:: max(1, len(alive) // 8)][:8]


def _lively_copy(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """The same mask with BN statistics measured on `x` and positive BN shifts, so that ReLUs fire and a
    weight on a path shows its influence (with zero shifts and four random images, a unit after a ReLU whose
    kept weights sum to a negative number is off for every image: dead for these values, not by structure)."""
    import copy
    lively = copy.deepcopy(model)
    g = torch.Generator().manual_seed(5)
    norms = [m for m in lively.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one batch gives that batch's statistics
            m.bias.copy_(torch.rand(m.bias.shape, generator=g) + 1.0)
        lively.train()(x)
    return lively.eval()


def _matters(model: nn.Module, alive: dict[str, torch.Tensor], x: torch.Tensor) -> list[bool]:
    """For one effective weight in each of eight layers: does zeroing it change the output?"""
    layers = weight_layers(model)
    g = torch.Generator().manual_seed(4)
    matters = []
    with torch.no_grad():
        reference = model(x)
        for lname in _sampled(alive):
            idx = alive[lname].flatten().nonzero().flatten()
            pick = int(idx[torch.randint(len(idx), (1,), generator=g)])
            w = layers[lname].weight.view(-1)
            kept = float(w[pick])
            w[pick] = 0.0
            matters.append(bool((model(x) - reference).abs().max() > 1e-12))
            w[pick] = kept
    return matters


def _copy_without(model: nn.Module, alive: dict[str, torch.Tensor]) -> nn.Module:
    import copy
    cleared = copy.deepcopy(model)
    with torch.no_grad():
        for lname, module in weight_layers(cleared).items():
            module.weight.mul_(alive[lname].to(module.weight.dtype))
    return cleared


# ------------------------------------------------------------------------------------ audit


def test_audit_reports_dense_dead_and_effective_sparsity(caplog):
    model = timm.create_model("resnet18", num_classes=10, in_chans=1).eval()
    layers = find_prunable_layers(model)
    with torch.no_grad():
        model.fc.weight[:, :256] = 0.0  # half of the pooled features feed nothing: layer4.1.conv2 rows die
    audit = audit_model(model, layers, 0.0, input_shape=(1, 1, 28, 28))
    summary = audit.summary()
    assert summary["dense_dead_fraction"] == pytest.approx(6946816 / audit.prunable_params)
    assert summary["effective_sparsity"] > summary["dense_dead_fraction"] + 0.01
    assert summary["effective_sparsity"] > audit.achieved + 0.01
    assert any(r.levelname == "WARNING" and "Effective sparsity" in r.getMessage() for r in caplog.records)
    row = audit.layers.set_index("name").loc["layer4.1.conv2"]
    assert row["dense_dead_fraction"] == pytest.approx(8 / 9)
    assert row["effective_sparsity"] == pytest.approx(1 - 0.5 / 9)  # centre taps of 256 of 512 filters

    plain = audit_model(model, layers, 0.0)
    assert plain.summary()["dense_dead_fraction"] is None and plain.summary()["effective_sparsity"] is None
    assert plain.layers["effective_sparsity"].isna().all()


def test_report_shows_effective_sparsity_when_recorded():
    import pandas as pd

    from ptsbench.analysis.report import markdown_table, results_table
    old = {"model": "resnet18", "method": "magnitude", "target_sparsity": 0.5, "seed": 0, "status": "ok",
           "achieved_sparsity": 0.5, "top1": 80.0, "dense_top1": 90.0}
    new = dict(old, seed=1, effective_sparsity=0.8, dense_dead_fraction=0.62)
    assert "effective" not in markdown_table(results_table(pd.DataFrame([old])))
    table = results_table(pd.DataFrame([old, new]))
    assert "effective" in markdown_table(table)
    assert table["effective_sparsity"].tolist()[1] == 0.8 and "dense_dead_fraction" in table


class Mask(nn.Module):
    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


def test_masks_under_parametrize_and_inference_mode():
    """Masks still attached (parametrize) count, and an audit called under inference mode still
    differentiates."""
    from torch.nn.utils import parametrize
    net = nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU(), nn.Linear(4, 2))  # no bias: unit 0 is silent
    mask = torch.ones(4, 3)
    mask[0] = 0
    parametrize.register_parametrization(net[0], "weight", Mask(mask))
    with torch.inference_mode():
        alive = reachable_weights(net, (1, 3))
    assert alive["0"].sum() == 9 and not alive["2"][:, 0].any() and alive["2"].sum() == 6
    assert parametrize.is_parametrized(net[0])  # the model itself is untouched


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2", "vit_tiny"])
def test_constant_sources_keep_the_weights_that_read_them(name):
    """The shipped dense models, pruned by global magnitude to 0.9 with every bias and normalisation shift
    left as trained: zeroing what the audit calls ineffective leaves the logits where they were, and some
    weights are effective only because a cut-off unit still emits its bias or BatchNorm shift."""
    from ptsbench.data import DataSpec
    from ptsbench.models import create_model, load_checkpoint
    from tests.conftest import compose_config

    cfg = compose_config([f"model={name}"])
    size = int(cfg.model.img_size or 28)
    model = create_model(cfg.model, DataSpec("fashion_mnist", 10, 1, size, (0.286,), (0.353,)))
    load_checkpoint(model, cfg.model)
    model = model.double().eval()
    layers = weight_layers(model)
    scores = torch.cat([m.weight.detach().abs().flatten() for m in layers.values()])
    threshold = scores.kthvalue(int(0.9 * scores.numel())).values
    with torch.no_grad():
        for m in layers.values():
            m.weight[m.weight.abs() <= threshold] = 0.0
    shape = (1, 1, size, size)
    alive = reachable_weights(model, shape)
    without_constants = copy.deepcopy(model)
    zero_constants(without_constants)
    paths_only = reachable_weights(without_constants, shape)
    by_sources = sum(int((alive[n] & ~paths_only[n]).sum()) for n in alive)
    assert by_sources > 0, "no weight reads a constant source: the check below would not test them"
    assert all(not (paths_only[n] & ~alive[n]).any() for n in alive)  # sources only add effective weights
    x = torch.randn(8, 1, size, size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        reference = model(x)
        assert torch.allclose(_copy_without(model, alive)(x), reference, rtol=0, atol=1e-9)
        # and the weights that only read a constant do move the logits (the old count called them dead)
        assert not torch.allclose(_copy_without(model, paths_only)(x), reference, rtol=0, atol=1e-9)
