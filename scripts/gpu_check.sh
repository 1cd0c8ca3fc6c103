#!/usr/bin/env bash
# The GPU path in one go (planned for under ~10 minutes on one H200):
#   1. set-up (scripts/setup.sh), unless PTSBENCH_PYTHON names an interpreter that already has ptsbench's
#      dependencies (an offline GPU image);
#   2. the `gpu` tests (tests/test_gpu.py: a tiny job on cuda, tensors kept on the device, the 2:4 kernel);
#   3. the reference budget on ImageNet-shaped inputs: FCPTS with its released code's budget (1,600
#      iterations of batch 64, 1,024 calibration images) on ResNet-50 at 224 px (and 200 iterations with
#      compile=true, for the fused masks' seconds per iteration), beside magnitude+BN, and
#      magnitude 2:4 on ResNet-50 and ViT-B/16 for the measured semi-structured speed label. The images are
#      random-pixel, random-label JPEGs in an ImageFolder (1,000 classes) and the dense weights a random
#      initialisation: accuracies mean nothing here, timings, passes, memory and labels do.
# Prints one line per job. GPU_CHECK_DIR keeps the generated data and results (default: a temp folder);
# GPU_CHECK_ITERATIONS shortens FCPTS (default 1600, the reference).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if [ -n "${PTSBENCH_PYTHON:-}" ]; then
  PY="$PTSBENCH_PYTHON"
else
  bash scripts/setup.sh
  PY=.venv/bin/python
fi
"$PY" -c "import sys, torch; sys.exit(None if torch.cuda.is_available() else 'gpu_check: CUDA is not available here')"
WORK="${GPU_CHECK_DIR:-$(mktemp -d -t ptsbench-gpu-XXXX)}"
export PTSBENCH_CACHE="$WORK/cache"
command -v nvidia-smi >/dev/null && nvidia-smi -L

echo "== gpu tests"
start=$SECONDS
"$PY" -m pytest -q -m gpu -s -p no:cacheprovider tests/test_gpu.py
echo "gpu tests: $((SECONDS - start)) s"

echo "== reference budget on ImageNet-shaped random-label inputs"
"$PY" - "$WORK" "${GPU_CHECK_ITERATIONS:-1600}" <<'EOF'
import json
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch
from omegaconf import open_dict
from PIL import Image
from safetensors.torch import save_file

from ptsbench.cli import compose_job_config
from ptsbench.runner import run_job

work, iterations = Path(sys.argv[1]), int(sys.argv[2])
root = work / "imagenet"
classes = [f"n{i:08d}" for i in range(1000)]
rng = np.random.default_rng(0)
t0 = time.perf_counter()
for split, n in (("train", 1024), ("val", 1000)):  # val: one image per class (ImageFolder wants every class)
    for i in range(n):
        folder = root / split / classes[i % len(classes)]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{split}_{i}.jpg"
        if not path.exists():
            Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(path, quality=90)
print(f"image folder: {time.perf_counter() - t0:.1f} s", flush=True)


def checkpoint(name: str) -> Path:
    path = work / f"{name}.safetensors"
    if not path.exists():
        model = timm.create_model(name, pretrained=False, num_classes=1000)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


# The FCPTS setting (conf/experiment/fcpts_imagenet.yaml) for every job: 1,024 calibration images, 224 -> 224.
common = ["data=imagenet", f"data.root={root}", "data.crop_pct=1.0", "data.num_workers=8", "calib.n=1024",
          "calib.batch_size=64", "eval.batch_size=250", "progress=false", "device=cuda", "logger=none"]
resnet = ["model=resnet50_tv_in1k", f"model.checkpoint={checkpoint('resnet50')}"]
vit = ["model=vit_tiny", "model.name=vit_base_patch16_224", "model.kwargs.patch_size=16",
       f"model.checkpoint={checkpoint('vit_base_patch16_224')}"]
jobs = {
    "fcpts resnet50 0.8": ["experiment=fcpts_imagenet"] + resnet + ["sparsity=0.8", f"algorithm.optimization.iterations={iterations}"],
    # the same with the fused masks (compile=true) on a shorter run: its s/iteration against the line above
    "fcpts resnet50 0.8 compile=true": ["experiment=fcpts_imagenet"] + resnet + [
        "sparsity=0.8", f"algorithm.optimization.iterations={min(iterations, 200)}", "compile=true"],
    "magnitude+bn resnet50 0.8": resnet + ["sparsity=0.8", "algorithm=magnitude_uniform_bn"],
    "magnitude 2:4 resnet50": resnet + ["sparsity=0.5", "pattern=2:4", "algorithm=magnitude"],
    "magnitude 2:4 vit_base": vit + ["sparsity=0.5", "pattern=2:4", "algorithm=magnitude"],
}
records = {}
for label, overrides in jobs.items():
    cfg = compose_job_config(common + overrides)
    with open_dict(cfg):
        cfg.cache_dir = str(work / "cache")
    t0 = time.perf_counter()
    r = run_job(cfg, work / "jobs" / label.replace(" ", "_").replace(":", "-"))
    records[label] = r
    speed = {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()
             if k.startswith(("speed", "linear_", "model_fp16", "model_speedup", "top1_semi"))}
    per_it = r["stats"].get("seconds_per_iteration")
    print(f"{label}: status {r['status']}, job {time.perf_counter() - t0:.0f} s, prune {r['prune_seconds']:.1f} s "
          f"({r['prune_seconds'] / 60:.2f} min" + (f", {per_it:.3f} s/iteration" if per_it else "") + "), "
          f"forward {r['forward_passes']} / backward {r['backward_passes']} images, peak "
          f"{r['peak_memory_mb']:.0f} MiB ({r['peak_memory_source']}), MACs sparse/dense "
          f"{r['macs_sparse'] / r['macs_dense']:.3f} of {r['macs_dense'] / 1e9:.2f} G, eval "
          f"{r['eval_images_per_second']:.0f} img/s, {speed}", flush=True)
(work / "gpu_check.json").write_text(json.dumps(records, indent=1, default=str))
fc = records["fcpts resnet50 0.8"]
print(f"FCPTS at {iterations} iterations on ResNet-50/224 ({torch.cuda.get_device_name()}): "
      f"{fc['prune_seconds'] / 60:.1f} minutes (the paper: 'minutes'); records in {work / 'gpu_check.json'}")
EOF
