"""Compressing LoRA r=8 adapters on MiniLM into TT-LoRA: metric retained against compression ratio,
without and with a short fine-tune, next to TT-LoRA trained from scratch at the same parameter count.

    python benchmarks/compress/run.py --tasks sst2 rte stsb --data-dir ../shared/data

Small CPU runs (caps in the results): LoRA and TT-LoRA trained with `ttpeft train`, compression with
`ttpeft.compress_lora`, the fine-tune with the train path (`ttpeft.compress_command.finetune_adapter`).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def train_run(output_dir: Path, task: str, method: str, args, extra: list[str], model: str = "minilm",
              caps: dict | None = None) -> dict:
    caps = caps or {k: getattr(args, k) for k in ("train_samples", "eval_samples", "epochs", "batch_size")}
    if not (output_dir / "results.json").is_file():
        command = [sys.executable, "-m", "ttpeft", "train", "--model", model, "--task", task, "--method", method,
                   "--data-dir", args.data_dir, "--max-train-samples", str(caps["train_samples"]),
                   *(["--max-eval-samples", str(caps["eval_samples"])] if caps["eval_samples"] else []),
                   "--epochs", str(caps["epochs"]),
                   "--batch-size", str(caps["batch_size"]), "--max-length", str(args.max_length),
                   "--output-dir", str(output_dir), "--no-progress", "--overwrite", *extra]
        print(" ".join(command[1:]), flush=True)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads((output_dir / "results.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", nargs="+", default=["sst2", "rte", "stsb"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[10.0, 30.0, 100.0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--train-samples", type=int, default=1000)
    parser.add_argument("--eval-samples", type=int, default=0, help="validation cap (0: the whole split)")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lora-lr", type=float, default=None, help="LoRA learning rate (default: the CLI's)")
    parser.add_argument("--smollm2", action="store_true",
                        help="only the SmolLM2 part: a LoRA adapter on SST-2 prompts compressed at --ratios")
    parser.add_argument("--work-dir", default="runs/compress-bench")
    parser.add_argument("--results", default=str(HERE / "results" / "results.json"))
    args = parser.parse_args()

    from ttpeft.compress import compress_lora
    from ttpeft.compress_command import finetune_adapter

    work = Path(args.work_dir)
    results_file = Path(args.results)
    results_file.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(results_file.read_text()) if results_file.is_file() else {"tasks": {}}
    if args.smollm2:
        results["smollm2"] = smollm2_part(work, args, compress_lora, finetune_adapter)
        results["smollm2"]["command"] = "python benchmarks/compress/run.py " + " ".join(sys.argv[1:])
        results_file.write_text(json.dumps(results, indent=2) + "\n")
        return
    results["caps"] = {k: getattr(args, k) for k in ("train_samples", "eval_samples", "epochs", "batch_size",
                                                     "max_length")}
    results["command"] = "python benchmarks/compress/run.py " + " ".join(sys.argv[1:])
    for task in args.tasks:
        started = time.time()
        lora = train_run(work / f"{task}-lora", task, "lora", args,
                         ["--r", "8"] + (["--lr", str(args.lora_lr)] if args.lora_lr else []))
        headline = lora["headline_metric"]
        lora_steps = lora["train"]["steps"]
        finetune_steps = max(1, math.floor(0.1 * lora_steps))
        entry = {"metric": headline, "lora": {"metric": lora["metrics"][headline], "steps": lora_steps,
                                              "trainable_params": lora["trainable_params"]},
                 "finetune_steps": finetune_steps, "points": []}
        # Adapter parameters only (the classification head is copied as it is).
        lora_params = compress_lora(work / f"{task}-lora", tt_rank=1).report["total"]["params_before"]
        for ratio in args.ratios:
            budget = int(lora_params / ratio)
            out = work / f"{task}-tt-x{ratio:g}"
            compressed = compress_lora(work / f"{task}-lora", out, param_budget=budget)
            tuned = finetune_adapter(out, task, finetune_steps, "minilm", data_dir=args.data_dir,
                                     lr=5e-3, batch_size=args.batch_size, max_length=args.max_length,
                                     max_train_samples=args.train_samples, max_eval_samples=args.eval_samples or None)
            total = compressed.report["total"]
            scratch = train_run(work / f"{task}-ttlora-scratch-x{ratio:g}", task, "ttlora", args,
                                ["--method-config", str(_write_budget(work, total["params_after"]))])
            entry["points"].append({
                "ratio_target": ratio, "lora_params": lora_params, "tt_params": total["params_after"],
                "ratio": total["compression_ratio"], "rel_error": total["rel_error"],
                "compressed": tuned["metrics_before"][headline], "compressed_finetuned": tuned["metrics_after"][headline],
                "scratch": scratch["metrics"][headline], "scratch_params": scratch["trainable_params"],
                "scratch_steps": scratch["train"]["steps"]})
            print(task, entry["points"][-1], flush=True)
        entry["wall_s"] = round(time.time() - started)
        results["tasks"][task] = entry
        results_file.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, results_file.with_suffix(".png"))
    results_file.with_suffix(".md").write_text(table(results))


SMOLLM2_CAPS = {"train_samples": 400, "eval_samples": 200, "epochs": 1.0, "batch_size": 8}


def smollm2_part(work: Path, args, compress_lora, finetune_adapter) -> dict:
    """SmolLM2-135M: a LoRA r=8 (q, v) adapter trained on SST-2 prompts, compressed; prompt accuracy of
    the source, of each compressed adapter, and after a short fine-tune (10% of the source's steps)."""
    caps = SMOLLM2_CAPS
    source = work / "smollm2-sst2-lora"
    lora = train_run(source, "sst2", "lora", args, ["--r", "8"], model="smollm2", caps=caps)
    steps = lora["train"]["steps"]
    finetune_steps = max(1, math.floor(0.1 * steps))
    lora_params = compress_lora(source, tt_rank=1).report["total"]["params_before"]
    part = {"caps": caps, "lora": {"accuracy": lora["metrics"]["accuracy"], "steps": steps, "params": lora_params},
            "finetune_steps": finetune_steps, "points": []}
    for ratio in args.ratios:
        out = work / f"smollm2-sst2-tt-x{ratio:g}"
        compressed = compress_lora(source, out, param_budget=int(lora_params / ratio))
        tuned = finetune_adapter(out, "sst2", finetune_steps, "smollm2", data_dir=args.data_dir, lr=5e-3,
                                 batch_size=caps["batch_size"], max_length=args.max_length,
                                 max_train_samples=caps["train_samples"], max_eval_samples=caps["eval_samples"])
        total = compressed.report["total"]
        part["points"].append({"ratio_target": ratio, "tt_params": total["params_after"],
                               "ratio": total["compression_ratio"], "rel_error": total["rel_error"],
                               "compressed": tuned["metrics_before"]["accuracy"],
                               "compressed_finetuned": tuned["metrics_after"]["accuracy"]})
        print("smollm2", part["points"][-1], flush=True)
    return part


def table(results: dict) -> str:
    """Markdown: per task, the source LoRA and, per ratio, compressed / + fine-tune / from scratch."""
    lines = ["| task (metric) | LoRA r=8 source | ratio | TT params | rel. error | compressed | + fine-tune | "
             "from scratch (TT params) | fine-tuned vs source |", "|---|---|---|---|---|---|---|---|---|"]
    for task, entry in results["tasks"].items():
        source = entry["lora"]["metric"]
        head = entry["lora"]["trainable_params"] - entry["points"][0]["lora_params"]  # copied, not compressed
        for point in sorted(entry["points"], key=lambda p: p["ratio"]):
            lines.append(
                f"| {task} ({entry['metric']}) | {100 * source:.1f} | {point['ratio']:.1f}x | {point['tt_params']:,} | "
                f"{point['rel_error']:.2f} | {100 * point['compressed']:.1f} | "
                f"{100 * point['compressed_finetuned']:.1f} | {100 * point['scratch']:.1f} "
                f"({point['scratch_params'] - head:,}) | {100 * (point['compressed_finetuned'] - source):+.1f} |")
    return "\n".join(lines) + "\n"


def _write_budget(work: Path, params: int) -> Path:
    path = work / f"budget-{params}.json"
    path.write_text(json.dumps({"param_budget": params}))
    return path


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = results["tasks"]
    figure, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    for ax, (task, entry) in zip(axes[0], tasks.items()):
        points = sorted(entry["points"], key=lambda p: p["ratio"])
        ratios = [p["ratio"] for p in points]
        ax.axhline(entry["lora"]["metric"], color="black", linestyle="--", label="LoRA r=8 (source)")
        ax.plot(ratios, [p["compressed"] for p in points], "o-", label="compressed")
        ax.plot(ratios, [p["compressed_finetuned"] for p in points], "s-",
                label=f"compressed + {entry['finetune_steps']} steps")
        ax.plot(ratios, [p["scratch"] for p in points], "^-", label="TT-LoRA from scratch")
        ax.set_xscale("log")
        ax.set_xlabel("compression ratio (LoRA / TT parameters)")
        ax.set_ylabel(entry["metric"])
        ax.set_title(task)
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
