"""Training step time and peak memory of TT-LoRA (and LoRETTA_rep) vs peft's LoRA r=8 on the same
bitsandbytes 4-bit (NF4, bf16 compute) and 8-bit LLaMA-architecture base, QLoRA style.

The base has random weights in a real LLaMA shape (``llama-1b``: TinyLlama-1.1B's), saved once and
loaded through ``from_pretrained(quantization_config=BitsAndBytesConfig(...))`` as a real checkpoint
would be. Adapters target q_proj and v_proj and stay in float32; AdamW on the adapter parameters,
causal-LM loss on random tokens. One command on a CUDA machine with ``pip install bitsandbytes``::

    python3 benchmarks/scaling/quantised_gpu.py

writes ``benchmarks/scaling/results/quantised_gpu.json`` (``--help`` for the shape, batch, methods).
A CPU dry run of the script itself (bitsandbytes' CPU backend, a tiny shape; timings meaningless)::

    python3 benchmarks/scaling/quantised_gpu.py --device cpu --shape llama-tiny --batch 2 --seq 64 \\
        --repeats 2 --out /tmp/quantised_dry_run.json
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "speed"))

from common import LLAMA_SHAPES, adapter_config, environment, llama_model, median_time, write_json  # noqa: E402
from peft import get_peft_model  # noqa: E402


def quantisation_config(kind: str):
    from transformers import BitsAndBytesConfig

    if kind == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                                  bnb_4bit_use_double_quant=True)
    return BitsAndBytesConfig(load_in_8bit=True)


def load_quantised(path: str, kind: str, device: str):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, quantization_config=quantisation_config(kind),
                                            dtype=torch.bfloat16, device_map={"": device})


def memory(device: str) -> dict:
    if device != "cuda":
        return {}
    return {"allocated_bytes": int(torch.cuda.memory_allocated()), "peak_bytes": int(torch.cuda.max_memory_allocated())}


def run_one(path: str, kind: str, method: str, args) -> dict:
    device = args.device
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model = load_quantised(path, kind, device)
    base_memory = memory(device)
    model = get_peft_model(model, adapter_config(method, "llama"))
    load_s = time.perf_counter() - start
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adapter_dtypes = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad})
    model.train()
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    inputs = torch.randint(0, vocab, (args.batch, args.seq), generator=generator).to(device)

    def step():
        loss = model(input_ids=inputs, labels=inputs).loss
        loss.backward()
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)

    step()  # first step: kernels and optimiser state
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    median_s, times = median_time(step, device, args.warmup, args.repeats)
    result = {
        "quantisation": kind, "method": method, "trainable_params": trainable, "adapter_dtypes": adapter_dtypes,
        "step_s_median": median_s, "step_s_all": times, "tokens_per_s": args.batch * args.seq / median_s,
        "load_and_wrap_s": load_s, "base_memory": base_memory, "step_memory": memory(device),
    }
    del model, optimiser, inputs
    gc.collect()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama-1b", choices=sorted(LLAMA_SHAPES))
    parser.add_argument("--quantisation", nargs="+", default=["4bit", "8bit"], choices=["4bit", "8bit"])
    parser.add_argument("--methods", nargs="+", default=["lora", "ttlora", "loretta_rep"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", default=os.path.join(HERE, "results", "quantised_gpu.json"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: this benchmark measures GPU step time and memory (--device cpu is a dry run)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        parser.error("bitsandbytes is not installed: pip install bitsandbytes (or ttpeft[quantised])")

    results = []
    with tempfile.TemporaryDirectory() as path:
        llama_model(args.shape, "cpu", torch.bfloat16).save_pretrained(path)  # random weights, as a checkpoint
        for kind in args.quantisation:
            for method in args.methods:
                result = run_one(path, kind, method, args)
                results.append(result)
                peak = result["step_memory"].get("peak_bytes")
                print(f"{kind} {method:12s} {result['trainable_params']:>10,d} params  "
                      f"{result['step_s_median'] * 1000:8.1f} ms/step"
                      + (f"  peak {peak / 2**30:.2f} GiB" if peak else ""), flush=True)
    write_json(args.out, {
        "benchmark": "quantised base training step", "shape": args.shape, "shape_config": LLAMA_SHAPES[args.shape],
        "batch": args.batch, "seq": args.seq, "warmup": args.warmup, "repeats": args.repeats, "device": args.device,
        "targets": ["q_proj", "v_proj"], "compute_dtype": "bfloat16", "environment": environment(),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "results": results,
    })
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
