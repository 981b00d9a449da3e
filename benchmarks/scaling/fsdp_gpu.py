"""TT-LoRA training of a LLaMA-architecture model through ``ttpeft train``, once as a plain single process and
once under ``accelerate launch --config_file configs/accelerate/fsdp.yaml`` (FSDP2: frozen base and TT cores
sharded per parameter, bf16 autocast, fp32 cores): mean step time and peak GPU memory of each, from the
runs' results.json.

The base has random weights in TinyLlama-1.1B's shape (``llama-1b``), saved once with MiniLM's tokenizer
(no download); the task is the embedded SST-2 sample scored by label words. One command on a CUDA machine::

    python3 benchmarks/scaling/fsdp_gpu.py

writes ``benchmarks/scaling/results/fsdp_gpu.json`` (``--help`` for shape, batch, processes). With one GPU
FSDP runs one process (NCCL allows one process per GPU); ``--processes 1 2`` on a machine with two.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(HERE, "..", "speed"))

from common import LLAMA_SHAPES, environment, write_json  # noqa: E402


def save_base(shape: str, folder: str) -> str:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ttpeft.models import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id,
                         **{**LLAMA_SHAPES[shape], "vocab_size": len(tokenizer)})
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run(mode: str, processes: int, model_dir: str, out_dir: str, args) -> dict:
    train = ["-m", "ttpeft", "train", "--model", model_dir, "--task", "sst2", "--data-dir", "embedded",
             "--method", "ttlora", "--tt-rank", "5", "--max-train-samples", str(args.examples),
             "--max-eval-samples", str(args.eval_examples), "--batch-size", str(args.batch), "--max-length",
             str(args.seq), "--epochs", "1", "--precision", args.precision, "--no-progress", "--overwrite",
             "--output-dir", os.path.join(out_dir, f"{mode}-{processes}")]
    if mode == "single":
        command = [sys.executable, *train]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   os.path.join(REPO, "configs", "accelerate", "fsdp.yaml"), "--num_processes", str(processes), *train]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.path.join(REPO, "src"),
                                                                     os.environ.get("PYTHONPATH")]))}
    print(f"{mode} x{processes}: {' '.join(command)}", flush=True)
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return {"mode": mode, "processes": processes, "error": done.stderr.strip().splitlines()[-20:]}
    results = json.loads(open(os.path.join(out_dir, f"{mode}-{processes}", "results.json")).read())
    train_summary = results["train"]
    return {"mode": mode, "processes": processes, "distributed": train_summary.get("distributed"),
            "steps": train_summary["steps"], "global_batch": train_summary.get("global_batch_size"),
            "mean_step_s": round(train_summary["train_runtime_s"] / max(1, train_summary["steps"]), 4),
            "train_loss": train_summary["train_loss"], "metrics": results["metrics"],
            "trainable_params": results["trainable_params"], "total_params": results["total_params"],
            "memory_mb": results["memory"], "wall_time_s": results["wall_time_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama-1b", choices=sorted(LLAMA_SHAPES))
    parser.add_argument("--modes", nargs="+", default=["single", "fsdp"], choices=["single", "fsdp"])
    parser.add_argument("--processes", nargs="+", type=int, default=[1], help="FSDP process counts (one per GPU)")
    parser.add_argument("--batch", type=int, default=8, help="examples per step and process")
    parser.add_argument("--seq", type=int, default=128, help="tokens per example")
    parser.add_argument("--examples", type=int, default=800, help="training examples (one epoch)")
    parser.add_argument("--eval-examples", type=int, default=64)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--out", default=os.path.join(HERE, "results", "fsdp_gpu.json"))
    args = parser.parse_args()
    if "fsdp" in args.modes and not torch.cuda.is_available():
        sys.exit("fsdp_gpu.py: --modes fsdp needs CUDA GPUs (accelerate shards only on GPUs); "
                 "on CPU use --modes single")
    if max(args.processes) > max(1, torch.cuda.device_count()):
        sys.exit(f"fsdp_gpu.py: --processes {max(args.processes)} needs as many GPUs; "
                 f"this machine has {torch.cuda.device_count()}")

    with tempfile.TemporaryDirectory(prefix="ttpeft-fsdp-bench-") as scratch:
        model_dir = save_base(args.shape, os.path.join(scratch, args.shape))
        rows = [run("single", 1, model_dir, scratch, args)] if "single" in args.modes else []
        rows += [run("fsdp", n, model_dir, scratch, args) for n in args.processes if "fsdp" in args.modes]
    payload = {"benchmark": "fsdp_gpu", "shape": args.shape, "settings": vars(args), "environment": environment(),
               "runs": rows}
    write_json(args.out, payload)
    for row in rows:
        print(json.dumps(row))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
