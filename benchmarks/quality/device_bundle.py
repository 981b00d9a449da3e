"""A folder to carry to a GPU machine for the grid: the model with its weights in fp16, and the tasks' data.

A machine reached over a size-limited copy of the working tree (64 MiB here, the repository included) cannot
take MiniLM's 90 MB of fp32 weights, and the GLUE/SuperGLUE parquet files live outside the repository.
This writes both into one folder (ignored by git); `grid.py --model <out>/model --data-dir <out>/data` then
runs there as it does here. `ttpeft train` loads the fp16 copy in fp32 (its `float32_weights`), so only the
weights' rounding differs (relative 5e-4), not the precision of training.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from grid import REPO_ROOT, TASKS, split_list  # noqa: E402

SPLITS = ("train", "validation")
CARRY_LIMIT = 64 * 2**20  # what travels: the tracked files, the untracked ones git does not ignore, and this folder


def write_half_precision_model(source: Path, target: Path) -> None:
    """Every file of a model folder, its safetensors weights with floating tensors cast to fp16."""
    import torch
    from safetensors.torch import load_file, save_file

    weights = sorted(source.glob("*.safetensors"))
    if not weights:
        raise SystemExit(f"model folder {source} has no .safetensors weights; valid: a folder saved by "
                         "save_pretrained with safetensors (the default)")
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.gguf"))
    for path in weights:
        tensors = {name: t.half() if t.is_floating_point() else t for name, t in load_file(path).items()}
        save_file(tensors, target / path.name, metadata={"format": "pt"})


def copy_task_data(data_dir: Path, tasks: list[str], target: Path) -> None:
    for task in tasks:
        folder = Path(TASKS[task]) / task
        for split in SPLITS:
            source = data_dir / folder / f"{split}.parquet"
            if not source.is_file():
                raise SystemExit(f"task {task}: {source} is missing; valid: a --data-dir holding "
                                 f"{folder}/{{{','.join(SPLITS)}}}.parquet")
            (target / folder).mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / folder / source.name)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def tracked_bytes(repo: Path) -> int:
    """The working tree's tracked and untracked-not-ignored files (what travels besides the carried folder)."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                                capture_output=True, check=True).stdout.split(b"\0")
    except (OSError, subprocess.CalledProcessError):
        return 0
    return sum((repo / name.decode()).stat().st_size for name in listed if name and (repo / name.decode()).is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", help="a model alias or a local folder (default: minilm)")
    parser.add_argument("--data-dir", default=str(REPO_ROOT.parent / "shared" / "data"),
                        help="GLUE/SuperGLUE parquet folder (default: ../shared/data)")
    parser.add_argument("--tasks", default="sst2,stsb,cb,rte", help="comma-separated tasks (default: %(default)s)")
    parser.add_argument("--out", default=str(REPO_ROOT / "device-bundle"),
                        help="the folder to write; it must not exist (default: device-bundle/ in the repository)")
    args = parser.parse_args(argv)

    tasks = split_list(args.tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        parser.error(f"unknown tasks {unknown}; valid: {', '.join(TASKS)}")
    out = Path(args.out)
    if out.exists():
        parser.error(f"{out} exists; remove it or give another --out (nothing is overwritten)")

    from ttpeft.training import resolve_model

    source = resolve_model(args.model)
    if source.gguf_file:
        parser.error(f"model {args.model!r} is a GGUF file; valid: a folder with safetensors weights")
    write_half_precision_model(Path(source.path), out / "model")
    copy_task_data(Path(args.data_dir), tasks, out / "data")

    model_bytes, data_bytes = folder_bytes(out / "model"), folder_bytes(out / "data")
    inside_repo = out.resolve().is_relative_to(REPO_ROOT)
    total = model_bytes + data_bytes + tracked_bytes(REPO_ROOT)
    print(f"{out}: {(model_bytes + data_bytes) / 2**20:.1f} MiB (model {model_bytes / 2**20:.1f}, "
          f"data {data_bytes / 2**20:.1f}); with the repository {total / 2**20:.1f} MiB of {CARRY_LIMIT // 2**20}")
    if total > CARRY_LIMIT:
        print("over the limit: bundle fewer tasks", file=sys.stderr)
        return 1
    if inside_repo:
        print(f"carry {out.resolve().relative_to(REPO_ROOT)}; on the machine: python3 benchmarks/quality/grid.py "
              f"--model {out.name}/model --data-dir {out.name}/data …")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
