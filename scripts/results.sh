#!/usr/bin/env bash
# Rebuilds the committed studies in results/ from jobs run in runs/ (scratch, not committed). Each study
# is results/<study>/: records.jsonl (one record per job), allocations.csv (every job's per-layer
# allocation), and the tables and plots rebuilt from those two files alone.
#
#   fmnist_benchmark  the default benchmark (what scripts/bench.sh runs)       conf/experiment/fmnist_benchmark.yaml
#   pts_methods       learned methods at 0.8/0.9 (3 seeds on claims' cells)    conf/experiment/pts_methods*.yaml
#   unipts            UniPTS and its ablations beside the others (pts_methods) conf/study/unipts.yaml
#   technique_matrix  allocation x reconstruction, learned allocations replayed conf/study/technique_matrix.yaml
#   mask_overlap      which weights the methods keep, at 0.8                   conf/experiment/mask_overlap.yaml
#   oneshot           Wanda, SparseGPT, magnitude; unstructured, 2:4, 4:8      conf/experiment/oneshot.yaml
#   budget_curves     each method at several budgets; the Pareto view          conf/study/budget_curves.yaml
#   leaderboard       every method at each model's discriminating sparsities,  conf/study/leaderboard.yaml
#                     seeds 0-2 paired; the ranking (leaderboard.md)
#   second_dense_model  the claims' mobilenetv2 cells on a dense model of another training seed
#                                                                              conf/experiment/second_dense_model.yaml
#   claims            the papers' headline claims on the studies above         conf/study/claims.yaml
#
# Those files hold every list (models, algorithms, roles); model configs hold each model's sparsities.
# Jobs already finished with an identical config are skipped (resume=true), so an interrupted rebuild
# continues where it stopped; delete runs/<study> to recompute a study from scratch.
#
#   bash scripts/results.sh                          every study (hours on a 2-core CPU)
#   bash scripts/results.sh pts_methods claims       some studies, in the order given
#   MODELS=resnet18 bash scripts/results.sh          one model (any subset of the experiments' models)
#   ALGORITHMS=fcpts_quick,pot_quick bash scripts/results.sh pts_methods    a subset of pts_methods' algorithms
#   THREADS=1 ...                                    torch threads per job (run two scripts side by side)
#   ADD=1 bash scripts/results.sh pts_methods        a fresh clone has no runs/: keep each study's committed jobs,
#                                                    do not rerun them, and add the new ones (without ADD a study
#                                                    is rebuilt from runs/ alone; mask_overlap always reruns, it
#                                                    reads the masks in its job folders)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
STUDIES=(fmnist_benchmark leaderboard pts_methods unipts technique_matrix mask_overlap oneshot budget_curves second_dense_model claims)
common=()  # overrides for every sweep
[ -n "${MODELS:-}" ] && common+=("model=$MODELS")
[ -n "${THREADS:-}" ] && common+=("threads=$THREADS")
add=()  # collect beside the committed jobs
[ -n "${ADD:-}" ] && add=(--add)
status=0

sweep() {  # sweep STUDY EXPERIMENT [OVERRIDES...]: a failed job is recorded and the study is still collected
  local skip=()  # with ADD, the jobs the committed study holds are not rerun
  [ -n "${ADD:-}" ] && [ -f "results/$1/records.jsonl" ] && skip=("resume_studies=[results/$1]")
  .venv/bin/ptsbench "experiment=$2" ${common[@]+"${common[@]}"} ${skip[@]+"${skip[@]}"} "${@:3}" || status=1
}

fmnist_benchmark() {
  sweep fmnist_benchmark fmnist_benchmark
  $PY -m ptsbench.analysis.study runs/fmnist_benchmark --out results/fmnist_benchmark ${add[@]+"${add[@]}"} || status=1
  .venv/bin/ptsbench-report results/fmnist_benchmark || status=1
}

pts_methods() {
  sweep pts_methods pts_methods ${ALGORITHMS:+"algorithm=$ALGORITHMS"}
  sweep pts_methods pts_methods_seeds ${ALGORITHMS:+"algorithm=$ALGORITHMS"}
  sweep pts_methods pts_methods_control
  $PY -m ptsbench.analysis.study runs/pts_methods --out results/pts_methods ${add[@]+"${add[@]}"} || status=1
  .venv/bin/ptsbench-report results/pts_methods --reference --any-dataset || status=1
  $PY -m ptsbench.analysis.overlap --charts results/pts_methods --sparsity 0.9 || status=1
}

unipts() {
  $PY -m ptsbench.analysis.study runs/pts_methods --study unipts --out results/unipts ${add[@]+"${add[@]}"} || status=1
  .venv/bin/ptsbench-report results/unipts || status=1
}

technique_matrix() {  # at 0.9 (allocations from pts_methods) and at each model's highest discriminating
  # sparsity (from the leaderboard's quick learned jobs); every run is added beside the committed study
  local run=($PY -m ptsbench.analysis.matrix --source results/pts_methods results/leaderboard
             --runs runs/technique_matrix --out results/technique_matrix --add)
  local extra=(-- ${THREADS:+"threads=$THREADS"}) models="${MODELS:-resnet18,mobilenetv2,vit_tiny}"
  "${run[@]}" --models ${models//,/ } --sparsities 0.9 "${extra[@]}" || status=1
  "${run[@]}" --models resnet18 --sparsities 0.995 --allocations erk fcpts_quick \
    --reconstructions none block sparsegpt "${extra[@]}" || status=1
  "${run[@]}" --models mobilenetv2 vit_tiny --sparsities 0.94 --allocations erk fcpts_quick unipts_quick \
    --reconstructions none block sparsegpt "${extra[@]}" || status=1
}

mask_overlap() {
  ADD= sweep mask_overlap mask_overlap  # its analysis reads each job's masks: nothing committed to skip
  $PY -m ptsbench.analysis.overlap runs/mask_overlap --out results/mask_overlap || status=1
  .venv/bin/ptsbench-report results/mask_overlap || status=1
}

oneshot() {
  sweep oneshot oneshot
  $PY -m ptsbench.analysis.study runs/oneshot --out results/oneshot ${add[@]+"${add[@]}"} || status=1
  .venv/bin/ptsbench-report results/oneshot || status=1
}

budget_curves() {
  local models=()
  [ -n "${MODELS:-}" ] && models=(--models ${MODELS//,/ })
  $PY -m ptsbench.analysis.budget --runs runs/budget_curves --out results/budget_curves ${add[@]+"${add[@]}"} \
    ${models[@]+"${models[@]}"} -- ${THREADS:+"threads=$THREADS"} || status=1
}

leaderboard() {
  local models=()
  [ -n "${MODELS:-}" ] && models=(--models ${MODELS//,/ })
  $PY -m ptsbench.analysis.budget --study leaderboard --out results/leaderboard ${add[@]+"${add[@]}"} \
    ${models[@]+"${models[@]}"} -- ${THREADS:+"threads=$THREADS"} || status=1
  $PY -m ptsbench.analysis.leaderboard || status=1
}

second_dense_model() {
  sweep second_dense_model second_dense_model
  $PY -m ptsbench.analysis.study runs/second_dense_model --out results/second_dense_model ${add[@]+"${add[@]}"} || status=1
  .venv/bin/ptsbench-report results/second_dense_model || status=1
}

claims() {
  $PY -m ptsbench.analysis.claims --results results || status=1
}

[ $# -gt 0 ] || set -- "${STUDIES[@]}"
for study in "$@"; do
  case " ${STUDIES[*]} " in
    *" $study "*) "$study" ;;
    *) echo "results.sh: unknown study '$study'; the studies are: ${STUDIES[*]}" >&2; exit 2 ;;
  esac
done
exit $status
