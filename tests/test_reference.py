"""Measured rows beside the published numbers: `ptsbench-report --reference` on a small synthetic result set
(the real report code path, the committed reference CSV), the difference numbers and the marking of rows
without a published counterpart."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from ptsbench.analysis.reference import REFERENCE_COLUMNS, REFERENCE_CSV, load_reference, method_family
from ptsbench.analysis.report import main as report_main
from ptsbench.results import RESULT_FILE, write_json


def job(out: Path, name: str, **fields) -> None:
    record = {"model": "resnet18.tv_in1k", "dataset": "imagenet", "method": "magnitude-uniform",
              "algorithm": "magnitude", "target_sparsity": 0.5, "achieved_sparsity": 0.5, "dense_top1": 69.76,
              "top1": 50.0, "top5": 75.0, "calib_images": 1024, "calib_seed": 0, "seed": 0, "status": "ok",
              "error": None, "prune_seconds": 1.0}
    record.update(fields)
    write_json(out / name / RESULT_FILE, record)


@pytest.fixture
def sweep(tmp_path) -> Path:
    d = tmp_path / "sweep"
    # msbench ResNet-18, layer-wise reconstruction, 50%: published dense 71.00, top-1 70.19
    job(d, "0", method="magnitude-uniform+layer", top1=68.19)
    # UniPTS ResNet-50 at 90%, two seeds: published 68.6, no published dense accuracy
    job(d, "1", model="resnet50.tv_in1k", method="unipts", algorithm="unipts", target_sparsity=0.9,
        dense_top1=76.13, top1=67.6, calib_images=10240)
    job(d, "2", model="resnet50.tv_in1k", method="unipts", algorithm="unipts", target_sparsity=0.9,
        dense_top1=76.13, top1=68.0, calib_images=10240, seed=1, calib_seed=1)
    # MobileNetV2 block reconstruction with 2048 images: the calibration-size ablation row (65.51), not 64.34
    job(d, "3", model="mobilenetv2_100.ra_in1k", method="magnitude-uniform+block", dense_top1=72.97,
        top1=60.0, calib_images=2048)
    # FCPTS at 80%: the abstract gives no absolute value
    job(d, "4", model="resnet50.tv_in1k", method="fcpts-ste-kde", algorithm="fcpts", target_sparsity=0.8,
        top1=40.0)
    # Fashion-MNIST: published only on ImageNet
    job(d, "5", model="resnet18", dataset="fashion_mnist", method="magnitude-uniform+bn", dense_top1=89.18,
        top1=87.29)
    # a method no paper reports, and a failed job that must not appear
    job(d, "6", model="vit_tiny_patch16_224", method="magnitude-erk", top1=30.0)
    job(d, "7", method="magnitude-uniform+layer", target_sparsity=0.6, status="failed", error="boom",
        top1=None)
    return d


def run_report(*args: str) -> int:
    return report_main([str(a) for a in args])


def test_committed_reference_csv():
    ref = load_reference()
    assert list(ref.columns) == REFERENCE_COLUMNS
    assert len(ref) == 63 and ref["notes"].notna().all()
    row = ref[(ref["model"] == "ResNet-50") & (ref["method"] == "UniPTS")].iloc[0]
    assert row["sparsity"] == 0.9 and row["top1"] == 68.6


@pytest.mark.parametrize("label,family", [
    ("magnitude-uniform", "uniform mag no-recon"),
    ("magnitude-uniform+bn", "uniform mag no-recon"),
    ("magnitude-uniform+layer", "uniform mag + layer recon"),
    ("magnitude-uniform+bn+block-sparseinp", "uniform mag + block recon"),
    ("magnitude-erk+bn", None),
    ("magnitude-global_l2norm+layer", None),
    ("pot", "POT"),
    ("pot-uniform-blockrecon", "POT"),
    ("fcpts-ste-kde-64it", "FCPTS"),
    ("unipts-nosearch-erk", "UniPTS"),
    ("random", None),
])
def test_method_families(label, family):
    assert method_family(label) == family


def test_reference_comparison_numbers_and_marking(sweep, tmp_path):
    out = tmp_path / "report"
    assert run_report(sweep, "--reference", "--out", out) == 0
    for name in ("results.csv", "results.md", "reference_comparison.csv", "reference_comparison.md"):
        assert (out / name).exists(), name
    cmp = pd.read_csv(out / "reference_comparison.csv")
    assert len(cmp) == 6  # seven finished jobs, two of them seeds of one row; the failed job is left out
    assert "published_dataset" not in cmp.columns
    by = {(r.model, r.method, r.target_sparsity): r for r in cmp.itertuples()}

    r18 = by[("resnet18.tv_in1k", "magnitude-uniform+layer", 0.5)]
    assert r18.published_paper == "msbench-docs" and r18.published_method == "uniform mag + layer recon"
    assert r18.published_top1 == pytest.approx(70.19) and r18.published_dense_top1 == pytest.approx(71.00)
    assert r18.top1_diff == pytest.approx(68.19 - 70.19)
    assert r18.dense_diff == pytest.approx(69.76 - 71.00)
    assert r18.drop_diff == pytest.approx((69.76 - 68.19) - (71.00 - 70.19))
    assert isinstance(r18.note, float) and math.isnan(r18.note)  # nothing to remark: an empty cell

    uni = by[("resnet50.tv_in1k", "unipts", 0.9)]
    assert uni.seeds == 2 and uni.top1 == pytest.approx(67.8) and \
        uni.top1_std == pytest.approx(0.2828, abs=1e-4)
    assert uni.published_top1 == pytest.approx(68.6) and uni.top1_diff == pytest.approx(-0.8)
    assert math.isnan(uni.dense_diff) and math.isnan(uni.drop_diff)  # the abstract gives no dense accuracy

    mbv2 = by[("mobilenetv2_100.ra_in1k", "magnitude-uniform+block", 0.5)]
    assert mbv2.published_calib_images == 2048 and mbv2.published_top1 == pytest.approx(65.51)
    assert mbv2.top1_diff == pytest.approx(60.0 - 65.51)

    fc = by[("resnet50.tv_in1k", "fcpts-ste-kde", 0.8)]
    assert fc.published_paper == "FCPTS" and math.isnan(fc.published_top1) and math.isnan(fc.top1_diff)
    assert fc.note.startswith("published top-1 not stated (abstract: >30% absolute gain")

    fm = by[("resnet18", "magnitude-uniform+bn", 0.5)]
    assert math.isnan(fm.published_top1) and isinstance(fm.published_paper, float)
    assert fm.note.startswith("no published counterpart on fashion_mnist (published on ImageNet")
    vit = by[("vit_tiny_patch16_224", "magnitude-erk", 0.5)]
    assert vit.note == "no published counterpart"

    md = (out / "reference_comparison.md").read_text()
    assert "4 of 6 measured rows have a published counterpart" in md
    vit_line = next(line for line in md.splitlines() if line.startswith("| vit_tiny_patch16_224"))
    assert "| — |" in vit_line and "no published counterpart" in vit_line
    r18_line = next(line for line in md.splitlines() if "magnitude-uniform+layer" in line)
    assert "| 70.19 |" in r18_line and "| -2.00 |" in r18_line and "| +0.76 |" in r18_line


def test_any_dataset_matches_across_datasets_and_shows_it(sweep, tmp_path):
    out = tmp_path / "report"
    assert run_report(sweep, "--reference", "--any-dataset", "--out", out) == 0
    cmp = pd.read_csv(out / "reference_comparison.csv")
    fm = cmp[cmp["dataset"] == "fashion_mnist"].iloc[0]
    assert fm["published_dataset"] == "ImageNet" and fm["published_method"] == "uniform mag no-recon"
    assert fm["published_top1"] == pytest.approx(48.23) and fm["top1_diff"] == pytest.approx(87.29 - 48.23)
    assert fm["note"] == "different dataset (fashion_mnist vs ImageNet)"
    same = cmp[cmp["model"] == "resnet18.tv_in1k"].iloc[0]
    assert same["published_dataset"] == "ImageNet" and pd.isna(same["note"])
    assert "| published dataset |" in (out / "reference_comparison.md").read_text()


def test_reference_option_forms_and_errors(sweep, tmp_path, capsys):
    # `--reference DIR`: DIR is taken as a result directory and the committed CSV is used
    assert run_report("--reference", sweep, "--out", tmp_path / "a") == 0
    assert (tmp_path / "a" / "reference_comparison.md").read_text().count(REFERENCE_CSV.name) == 1
    # another CSV with the same columns
    other = tmp_path / "mine.csv"
    pd.DataFrame([{"paper": "mine", "model": "ResNet-18", "dataset": "ImageNet", "dense_top1": 70.0,
                   "sparsity": 0.5, "method": "uniform mag + layer recon", "top1": 69.0, "calib_images": 1024,
                   "notes": "test"}]).to_csv(other, index=False)
    assert run_report(sweep, "--reference", other, "--out", tmp_path / "b") == 0
    cmp = pd.read_csv(tmp_path / "b" / "reference_comparison.csv")
    assert cmp["published_paper"].dropna().tolist() == ["mine"]
    assert cmp.loc[cmp["published_paper"] == "mine", "top1_diff"].item() == pytest.approx(-0.81)
    # a CSV that is not a reference table, and a missing one
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    assert run_report(sweep, "--reference", bad, "--out", tmp_path / "c") == 2
    assert "lacks the columns paper, model" in capsys.readouterr().err
    assert run_report(sweep, "--reference", tmp_path / "none.csv", "--out", tmp_path / "d") == 2
    assert "none.csv' does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_report(sweep, "--any-dataset")


def test_methods_filter_and_table_by_sparsity(sweep, tmp_path, capsys):
    out = tmp_path / "unipts"
    assert run_report(sweep, "--methods", "unipts*", "fcpts-*", "--out", out) == 0
    table = pd.read_csv(out / "results.csv")
    assert sorted(table["method"]) == ["fcpts-ste-kde", "unipts", "unipts"]
    text = (out / "results.md").read_text()
    assert "`unipts*`" in text and "magnitude-uniform" not in text
    # one row per (model, method): the two UniPTS seeds averaged, their count shown, seconds beside
    row = next(line for line in text.splitlines() if line.startswith("| resnet50.tv_in1k | unipts"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:] == ["", "67.80 (n=2)", "", "1"]  # columns: 0.8, 0.9, s 0.8, s 0.9
    assert run_report(sweep, "--methods", "lamp*", "--out", tmp_path / "none") == 1
    assert "matching ['lamp*']" in capsys.readouterr().err


def test_a_method_keeps_its_style_in_every_panel():
    from ptsbench.analysis.report import method_styles

    few, more = method_styles(["pot", "unipts", "fcpts"]), \
        method_styles([f"m{i}" for i in range(14)] + ["pot"])
    assert few == method_styles(["fcpts", "pot", "unipts", "pot"])  # order and repeats do not matter
    for styles in (few, more):
        assert len({(st["color"], st["marker"]) for st in styles.values()}) == len(styles)
        assert len({st["color"] for st in styles.values()}) == len(styles)  # tab20 beyond ten methods


@pytest.mark.parametrize("labels",
                         [["pot", "unipts"], [f"magnitude-from_unipts+bn+block-{i}" for i in range(15)]])
def test_the_legend_below_the_panels_fits_the_figure(labels):
    import matplotlib.pyplot as plt

    from ptsbench.analysis.report import legend_columns

    fig = plt.figure(figsize=(15.6, 4.2))
    ncol = legend_columns(labels, fig.get_figwidth(), fontsize=8)
    handles = [plt.Line2D([], [], marker="o", label=label) for label in labels]
    legend = fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.canvas.draw()
    box, frame = legend.get_window_extent(), fig.bbox
    plt.close(fig)
    assert ncol == len(labels) or ncol >= 3  # short labels share one row; long ones still use the width
    assert frame.x0 <= box.x0 and box.x1 <= frame.x1, (box, frame)
