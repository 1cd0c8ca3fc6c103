#!/usr/bin/env bash
# Rebuilds the committed results of the PTS methods: results/pts_methods (every method x model x
# sparsity), results/technique_matrix (allocation x reconstruction) and results/mask_overlap.
# Jobs already finished with an identical config are skipped (resume), so an interrupted rebuild
# continues where it stopped; delete a directory to recompute it from scratch.
#
#   bash scripts/results.sh                      everything (hours on a 2-core CPU)
#   MODELS=resnet18 bash scripts/results.sh      one model
#   ALGORITHMS=fcpts_quick,pot_quick SPARSITIES=0.8,0.9 bash scripts/results.sh
#   THREADS=1 ...                                torch threads per job (run two scripts side by side)
#
# results/README.md says which parts were run for the committed tables.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
MODELS="${MODELS:-resnet18,mobilenetv2,vit_tiny}"
SPARSITIES="${SPARSITIES:-0.5,0.7,0.8,0.9,0.95}"
ALGORITHMS="${ALGORITHMS:-magnitude_uniform_bn,magnitude_erk_bn,magnitude_global_bn,fcpts_quick,fcpts_quick_ste,fcpts_quick_code,unipts_quick,unipts_quick_nosearch,unipts_quick_nodst,unipts_quick_kl,pot_quick}"
MATRIX_SPARSITIES="${MATRIX_SPARSITIES:-0.5 0.7 0.8 0.9}"
THREADS="${THREADS:-null}"
status=0

# 1. Every method x sparsity, one sweep directory per model; then one table and plot over all of them.
for model in ${MODELS//,/ }; do
  .venv/bin/ptsbench experiment=pts_methods "model=$model" "algorithm=$ALGORITHMS" "sparsity=$SPARSITIES" \
    "threads=$THREADS" "hydra.sweep.dir=results/pts_methods/$model" || status=1
done
.venv/bin/ptsbench-report results/pts_methods/*/ --out results/pts_methods --reference --any-dataset || status=1
# UniPTS and its ablations beside FCPTS, POT and the magnitude baselines: one table and plot.
.venv/bin/ptsbench-report results/pts_methods/*/ --out results/unipts \
  --methods 'unipts*' 'fcpts-*-kde-64it' 'magnitude-*' pot || status=1

# Per-layer sparsity at 0.9 on each model: FCPTS's learned allocation against ERK and global (+ UniPTS, POT).
.venv/bin/python - <<'PY' || status=1
import subprocess
from ptsbench.results import load_records
r = load_records(["results/pts_methods"])
r = r[(r.status == "ok") & ((r.target_sparsity - 0.9).abs() < 1e-9) & (r.seed == 0)]
keep = ("magnitude-erk+bn", "magnitude-global+bn", "fcpts-sparsity_only-kde-64it", "unipts", "pot")
for model, g in r.groupby("model"):
    jobs = g[g.method.isin(keep)].drop_duplicates("method").sort_values("method").job_dir.tolist()
    short = {"mobilenetv2_100": "mobilenetv2", "vit_tiny_patch16_224": "vit_tiny"}.get(model, model)
    subprocess.run([".venv/bin/python", "-m", "ptsbench.masks", *jobs, "--out", "results/pts_methods",
                    "--plot-only", f"layer_sparsity_{short}_0.9.png"], check=True)
PY

# 2. Allocation x reconstruction, with FCPTS's and UniPTS's allocations cross-applied.
for model in ${MODELS//,/ }; do
  .venv/bin/python -m ptsbench.matrix --source results/pts_methods --out "results/technique_matrix/$model" \
    --models "$model" --sparsities $MATRIX_SPARSITIES -- "threads=$THREADS" || status=1
done
.venv/bin/python -m ptsbench.matrix --report-only --source results/pts_methods --out results/technique_matrix \
  || status=1  # every model's cells in one table

# 3. Mask overlap at 0.8: the same jobs again with save_sparse=true, one sweep per model, then IoU per
#    layer and overall within each model. Same seed and same torch thread count give the pts_methods
#    jobs' masks (mask_hash); with a different thread count the methods that train (FCPTS, UniPTS) sum
#    floats in another order and differ.
for model in ${MODELS//,/ }; do
  .venv/bin/ptsbench -m "model=$model" sparsity=0.8 save_sparse=true resume=true experiment_name=mask_overlap \
    algorithm=magnitude_erk_bn,magnitude_global_bn,pot_quick,fcpts_quick,unipts_quick \
    "threads=$THREADS" "hydra.sweep.dir=results/mask_overlap/$model" || status=1
done
.venv/bin/python -m ptsbench.masks results/mask_overlap/*/[0-9]* --out results/mask_overlap || status=1

# 4. The papers' headline claims against all of the above.
.venv/bin/python -m ptsbench.claims --results results || status=1
exit $status
