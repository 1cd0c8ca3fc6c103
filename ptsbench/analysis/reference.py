"""Measured results beside published ones (`ptsbench-report DIR --reference [CSV]`).

The papers name models, methods and datasets their own way (ResNet-18, "uniform mag + layer recon",
ImageNet), the harness records timm names and method labels (resnet18.tv_in1k, magnitude-uniform+layer,
imagenet). The small tables below are the whole mapping between the two, so a match can always be
traced by hand. A measured row is matched on (model, dataset, target sparsity, method family); where a
paper gives several rows for that key (msbench's calibration-size ablation), the one with the same number
of calibration images is taken. Measured rows without a published counterpart are kept and marked.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from ptsbench.errors import DataError
from ptsbench.results import write_atomic, write_csv

REFERENCE_CSV = Path(__file__).resolve().parents[2] / "results" / "reference" / "paper_numbers.csv"
REFERENCE_COLUMNS = ["paper", "model", "dataset", "dense_top1", "sparsity", "method", "top1", "calib_images",
                     "notes"]

# timm architecture (the pretrained tag after '.' is dropped) -> the papers' model name.
MODEL_NAMES = {
    "resnet18": "ResNet-18",
    "resnet50": "ResNet-50",
    "mobilenetv2_100": "MobileNetV2-1.0",
    "regnetx_006": "RegNetX-600MF",
}
# The harness's dataset name -> the papers'. fashion_mnist, cifar10 and imagenet_probe (20 images) have
# no published counterpart; --any-dataset compares across datasets anyway.
DATASET_NAMES = {"imagenet": "ImageNet"}
# First '-'-separated token of a method label -> the papers' method name.
METHOD_PREFIXES = {"fcpts": "FCPTS", "unipts": "UniPTS", "pot": "POT"}
# Uniform magnitude pruning ('magnitude-uniform' labels) by reconstruction mode -> msbench's method name.
UNIFORM_MAGNITUDE = {
    "none": "uniform mag no-recon",
    "layer": "uniform mag + layer recon",
    "block": "uniform mag + block recon",
}
SPARSITY_TOLERANCE = 1e-6

COMPARISON_COLUMNS = [
    "model", "dataset", "method", "target_sparsity", "calib_images", "seeds", "dense_top1", "top1",
                      "top1_std",
    "published_paper", "published_model", "published_dataset", "published_method", "published_calib_images",
    "published_dense_top1", "published_top1", "dense_diff", "top1_diff", "drop_diff", "note",
                      "published_notes",
]


def paper_model(model: str) -> str | None:
    return MODEL_NAMES.get(str(model).split(".")[0])


def method_family(label: str) -> str | None:
    """The papers' name for the method a label denotes, or None when no paper reports that method.

    'magnitude-uniform', 'magnitude-uniform+bn' -> 'uniform mag no-recon'; 'magnitude-uniform+layer' (and
    +bn, -sparseinp variants) -> 'uniform mag + layer recon'; 'pot...', 'fcpts...', 'unipts...' -> POT,
    FCPTS, UniPTS whatever their variant (the label column shows which).
    """
    head, *tags = str(label).split("+")
    if head == "magnitude-uniform":
        modes = [t.split("-")[0] for t in tags if t.split("-")[0] in UNIFORM_MAGNITUDE]
        return UNIFORM_MAGNITUDE[modes[-1] if modes else "none"]
    return METHOD_PREFIXES.get(head.split("-")[0])


def load_reference(path: str | Path = REFERENCE_CSV) -> pd.DataFrame:
    """The published numbers, one row per (paper, model, dataset, sparsity, method, calibration size)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Reference CSV {str(path)!r} does not exist (--reference CSV; the committed one is "
                        f"{REFERENCE_CSV}).")
    ref = pd.read_csv(path)
    missing = [c for c in REFERENCE_COLUMNS if c not in ref.columns]
    if missing:
        raise DataError(f"Reference CSV {str(path)!r} lacks the columns {', '.join(missing)} "
                        f"(expected {', '.join(REFERENCE_COLUMNS)}).")
    for col in ("dense_top1", "sparsity", "top1", "calib_images"):
        ref[col] = pd.to_numeric(ref[col], errors="coerce")
    return ref


def measured_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Finished jobs averaged over seeds, one row per (model, dataset, method, sparsity, calibration size)."""
    keys = ["model", "dataset", "method", "target_sparsity", "calib_images"]
    ok = table[table["status"] == "ok"].copy() if len(table) else table
    if ok.empty:
        return pd.DataFrame(columns=[*keys, "seeds", "dense_top1", "top1", "top1_std"])
    for col in ("target_sparsity", "calib_images", "dense_top1", "top1"):
        ok[col] = pd.to_numeric(ok[col], errors="coerce")
    agg = ok.groupby(keys, dropna=False, sort=True).agg(
        seeds=("seed", "nunique"), dense_top1=("dense_top1", "mean"), top1=("top1", "mean"),
        top1_std=("top1", "std"))
    return agg.reset_index()


def _pick(candidates: pd.DataFrame, calib_images: float) -> pd.Series:
    """The published row with the same calibration size if there is one, else the first in file order."""
    same = candidates[candidates["calib_images"] == calib_images]
    return (same if len(same) else candidates).iloc[0]


def _finite(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def compare(table: pd.DataFrame, reference: pd.DataFrame, any_dataset: bool = False) -> pd.DataFrame:
    """Measured rows (mean over seeds) beside their published counterparts, with measured - published
    differences in top-1 points: `top1_diff`, `dense_diff`, and `drop_diff` (our drop from dense minus the
    paper's, positive when we lose more). Unmatched measured rows stay, with empty published columns."""
    rows = []
    for m in measured_summary(table).to_dict("records"):
        family, pmodel = method_family(m["method"]), paper_model(m["model"])
        pdataset = DATASET_NAMES.get(str(m["dataset"]))
        key = reference[(reference["method"] == family) & (reference["model"] == pmodel)
                        & ((reference["sparsity"] - float(m["target_sparsity"])).abs() < SPARSITY_TOLERANCE)]
        same_data = key[key["dataset"] == pdataset]
        candidates = key if any_dataset else same_data
        row = {**m, "note": ""}
        if family is None or pmodel is None or candidates.empty:
            row["note"] = "no published counterpart"
            if not any_dataset and len(key):
                row["note"] += (f" on {m['dataset']} (published on {', '.join(sorted(set(key['dataset'])))}; "
                                f"--any-dataset compares across datasets)")
            rows.append(row)
            continue
        pub = _pick(same_data if len(same_data) else candidates, m["calib_images"])
        row.update(published_paper=pub["paper"], published_model=pub["model"],
                   published_dataset=pub["dataset"],
                   published_method=pub["method"], published_calib_images=pub["calib_images"],
                   published_dense_top1=pub["dense_top1"], published_top1=pub["top1"],
                   published_notes=pub["notes"])
        notes = []
        if pub["dataset"] != pdataset:
            notes.append(f"different dataset ({m['dataset']} vs {pub['dataset']})")
        if not _finite(pub["top1"]):
            notes.append(f"published top-1 not stated ({pub['notes']})")
        if _finite(pub["calib_images"]) and pub["calib_images"] != m["calib_images"]:
            notes.append(f"calibration images differ ({m['calib_images']:g} vs {pub['calib_images']:g})")
        row["note"] = "; ".join(notes)
        row["top1_diff"] = m["top1"] - pub["top1"]
        row["dense_diff"] = m["dense_top1"] - pub["dense_top1"]
        row["drop_diff"] = (m["dense_top1"] - m["top1"]) - (pub["dense_top1"] - pub["top1"])
        rows.append(row)
    out = pd.DataFrame(rows, columns=COMPARISON_COLUMNS)
    if not any_dataset:
        out = out.drop(columns=["published_dataset"])
    return out


def _cell(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, (int, float)):
        return format(value, fmt)
    return str(value) if str(value) else "—"


MD_COLUMNS = {
    "model": ("model", "s"), "dataset": ("dataset", "s"), "method": ("method", "s"),
    "target_sparsity": ("sparsity", "g"), "calib_images": ("calib", "g"), "seeds": ("seeds", "g"),
    "dense_top1": ("dense", ".2f"), "top1": ("top-1", ".2f"), "published_paper": ("source", "s"),
    "published_dataset": ("published dataset", "s"), "published_method": ("published method", "s"),
    "published_dense_top1": ("published dense", ".2f"), "published_top1": ("published", ".2f"),
    "top1_diff": ("Δ top-1", "+.2f"), "drop_diff": ("Δ drop", "+.2f"), "note": ("note", "s"),
}


def comparison_markdown(comparison: pd.DataFrame, reference_path: Path, n_reference: int,
                        sources: str) -> str:
    matched = comparison["published_method"].notna() if len(comparison) else pd.Series(dtype=bool)
    lines = [
        "# Measured vs published",
        "",
        f"Published numbers: `{reference_path}` ({n_reference} rows). Measured: {sources} (finished jobs, "
        f"mean over seeds). {int(matched.sum())} of {len(comparison)} measured rows have a published "
        "counterpart.",
        "",
        "Δ top-1 = measured - published top-1 and Δ drop = measured drop from dense - published drop, in "
        "points (the drop compares methods across dense checkpoints that differ). The matching tables "
        "(model, dataset, method family) are in `ptsbench/reference.py`.",
        "",
    ]
    cols = [c for c in MD_COLUMNS if c in comparison.columns]
    header = [MD_COLUMNS[c][0] for c in cols]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(cols)]
    for row in comparison.to_dict("records"):
        lines.append("| " + " | ".join(_cell(row[c], MD_COLUMNS[c][1]) for c in cols) + " |")
    if comparison.empty:
        lines.append("(no finished jobs)")
    return "\n".join(lines) + "\n"


def write_reference_comparison(table: pd.DataFrame, out_dir: str | Path,
                               reference_path: str | Path = REFERENCE_CSV,
                               any_dataset: bool = False, sources: str = "") -> pd.DataFrame:
    """Write reference_comparison.csv and reference_comparison.md into `out_dir`; returns the comparison."""
    reference = load_reference(reference_path)
    comparison = compare(table, reference, any_dataset=any_dataset)
    out = Path(out_dir)
    write_csv(out / "reference_comparison.csv", comparison)
    write_atomic(out / "reference_comparison.md",
                 comparison_markdown(comparison, Path(reference_path), len(reference),
                                     sources or "result files"))
    return comparison
