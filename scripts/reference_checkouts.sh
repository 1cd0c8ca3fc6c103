#!/usr/bin/env bash
# Prepare a folder of reference implementations for tests/test_bench_reference.py, OUTSIDE this project:
#   bash scripts/reference_checkouts.sh /tmp/ptsbench-reference
#   PTSBENCH_REFERENCE=/tmp/ptsbench-reference bash scripts/test.sh -m bench -s tests/test_bench_reference.py
# It clones ModelTC/FCPTS, ModelTC/msbench and xjjxmu/UniPTS at the commits the specification digest read
# (shared/reference/pts-algorithms.md) and installs the two packages their imports need that the harness does
# not (yacs, termcolor) into DIR/pydeps with `pip --target`, leaving .venv untouched. The reference code is
# never copied into the project; the benchmark only imports it from DIR.
set -euo pipefail
dir="${1:?usage: scripts/reference_checkouts.sh DIR (a folder outside the project)}"
root="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
case "$dir/" in
  "$root"/*) echo "reference_checkouts: $dir is inside the project; pick a folder outside it" >&2; exit 1;;
esac

checkout() {  # name, GitHub repository, commit
  if [ ! -d "$dir/$1/.git" ]; then
    git clone -q "https://github.com/$2.git" "$dir/$1"
  fi
  git -C "$dir/$1" -c advice.detachedHead=false checkout -q "$3"
}
checkout FCPTS ModelTC/FCPTS 5eed81e39e771914547cbb835fe6c30784330324
checkout msbench ModelTC/msbench b00632036c8a03cacff6ae94814195e98f1361f8
checkout UniPTS xjjxmu/UniPTS 7b29888cfce16032c21ca5d9dbe90b9cfd0f93fe

PY="$root/.venv/bin/python"
[ -x "$PY" ] || PY="${PYTHON:-python3}"
"$PY" -m pip install -q --no-deps --target "$dir/pydeps" yacs termcolor  # PyYAML: the harness has it
echo "reference_checkouts: ready; export PTSBENCH_REFERENCE=$dir"
