"""Shared pieces of the speed benchmarks: models from configs, adapter configs, timers, reports."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src"))

import ttpeft  # noqa: E402  (registers the methods)
from peft import LoraConfig  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

# LLaMA-architecture shapes with random weights (no download). "llama-1b" is TinyLlama-1.1B's shape;
# "llama2-7b-shape" has LLaMA-2-7B's layer shapes with fewer layers so 8x2048-token steps fit one GPU.
LLAMA_SHAPES = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=4, vocab_size=32000),
    "llama2-7b-shape": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=8,
                            num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "llama-tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=512),
}

METHODS = ("lora", "ttlora", "ttlora:reconstruct", "ttlora:sequential", "ttlora:ungrouped", "loretta_rep",
           "loretta_adp")


def llama_model(name: str, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(max_position_embeddings=4096, **LLAMA_SHAPES[name])
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model


def adapter_config(method: str, family: str):
    """peft config for a benchmark method name (``method[:variant]``); family is 'llama' or 'bert'."""
    name, _, variant = method.partition(":")
    targets = ["q_proj", "v_proj"] if family == "llama" else ["query", "value"]
    if name == "lora":
        return LoraConfig(r=8, lora_alpha=16, target_modules=targets)
    if name == "ttlora":
        strategy = variant if variant in ("reconstruct", "sequential", "auto") else "split"
        return ttpeft.TTLoraConfig(target_modules=targets, tt_rank=5, contraction=strategy)
    if name == "loretta_rep":
        return ttpeft.LorettaRepConfig(r=8, tensor_rank=5, target_modules=targets)
    if name == "loretta_adp":
        return ttpeft.LorettaAdpConfig(bottleneck_size=64, tensor_rank=5)
    raise ValueError(f"unknown benchmark method {method!r}; valid: {METHODS}")


def set_grouping(peft_model, method: str) -> None:
    if method.endswith(":ungrouped") and hasattr(peft_model.base_model, "group_factors"):
        peft_model.base_model.group_factors = False


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_time(step, device: str, warmup: int, repeats: int) -> tuple[float, list[float]]:
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def peak_memory_reset(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device: str) -> int | None:
    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except Exception:
        return None


def environment() -> dict:
    import peft
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "peft": peft.__version__, "ttpeft": ttpeft.__version__, "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
