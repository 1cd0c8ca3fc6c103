"""The embedded zoo's dense weights, shipped with the project.

Dense training dominates a cold first run, and float summation order differs between CPUs, so two machines
that train the same recipe get dense models a few tenths of a point apart and pruned accuracies that move
far more on cliff cells. The default model configs therefore load trained weights committed under
`ptsbench/zoo/` (half precision, sha256 pinned in the config); the recipe stays one command away:

    python -m ptsbench.zoo resnet18                 # train with the model config's recipe (or take the
                                                    # cached result) and write ptsbench/zoo/<file>
    python -m ptsbench.zoo vit_tiny train.seed=1    # another dense generation (extra Hydra overrides)

It prints the file's sha256 and the two config lines that pin it.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from omegaconf import DictConfig
from safetensors.torch import save_file

from ptsbench.dense import build_model, load_data, load_dense_weights, training_recipe
from ptsbench.models import file_sha256, stable_hash

log = logging.getLogger(__name__)

ZOO_DIR = Path(__file__).resolve().parent / "zoo"


def zoo_file_name(config_name: str, cfg: DictConfig) -> str:
    seed = int(cfg.train.seed)
    return f"{config_name}-{cfg.data.name}" + (f"-seed{seed}" if seed else "") + ".safetensors"


def export_dense(config_name: str, overrides: list[str], out_dir: Path = ZOO_DIR) -> tuple[Path, str, float]:
    """Train (or load from the dense cache) the recipe model of `model=<config_name>` and write it in fp16.

    Returns the file, its sha256 and the dense top-1 of the fp32 model it was rounded from.
    """
    from ptsbench.config import compose_job_config
    from ptsbench.runner import execution_device

    cfg = compose_job_config([f"model={config_name}", "model.checkpoint=null", "model.checkpoint_sha256=null",
                              *overrides])
    device = execution_device(cfg.get("threads"), cfg.device)
    cache_dir = Path(str(cfg.cache_dir)).expanduser()
    data = load_data(cfg, cache_dir)
    model = build_model(cfg, data)
    dense = load_dense_weights(cfg, model, data, cache_dir, device, progress=bool(cfg.progress))
    state = {k: (v.half() if v.is_floating_point() else v).detach().contiguous().cpu()
             for k, v in model.state_dict().items()}
    recipe = training_recipe(cfg)
    metadata = {"model": cfg.model.name, "config": config_name, "data": cfg.data.name,
                "img_size": str(data.spec.img_size), "recipe": str(recipe),
                "recipe_hash": stable_hash(recipe),
                "train_seed": str(cfg.train.seed), "dense_top1_fp32": f"{dense.top1:.4f}",
                "train_seconds": f"{dense.info.get('train_seconds') or float('nan'):.0f}"}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / zoo_file_name(config_name, cfg)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path, file_sha256(path), dense.top1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ptsbench.zoo", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a model config name (conf/model/<name>.yaml)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. train.seed=1 progress=false")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path, sha, top1 = export_dense(args.model, args.overrides)
    root = Path(__file__).resolve().parent
    print(f"{path} ({path.stat().st_size / 2**20:.1f} MiB), dense top-1 before rounding to fp16: {top1:.2f}%")
    print(f"checkpoint: pkg:ptsbench/{path.relative_to(root).as_posix()}")
    print(f"checkpoint_sha256: {sha}")


if __name__ == "__main__":
    main()
