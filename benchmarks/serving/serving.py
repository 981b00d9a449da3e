"""Serving many adapters on one base: memory per adapter, load and switch latency, mixed-adapter batches.

For each method (TT-LoRA, LoRETTA_rep, LoRETTA_adp with their default configs; peft's LoRA r=8 for
comparison; q and v projections except LoRETTA_adp, which sits after the output dense layers by
default) on the real MiniLM (``ttpeft.models.minilm_path()``), inference only (eval, no_grad):

* bytes of one adapter in memory, from its parameters' storage, and the process RSS growth per
  adapter while ``--adapters`` copies are loaded with ``load_adapter`` (its median time is the load
  latency);
* switch latency with all of them loaded: ``set_adapter`` alone, and the first forward after the switch
  (it rebuilds the thin factors of a TT adapter) against the next forward on the same adapter;
* one forward of a ``--batch`` x ``--seq`` batch whose rows use N different adapters
  (``adapter_names``), against the same batch on one adapter and on the base alone.

    python3 benchmarks/serving/serving.py

writes ``benchmarks/serving/results_minilm.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "src"))

import ttpeft  # noqa: E402  (registers the methods)
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import AutoModel  # noqa: E402

from ttpeft.models import minilm_path  # noqa: E402

METHODS = ("ttlora", "loretta_rep", "loretta_adp", "lora")
MIB = 2 ** 20


def adapter_config(method: str):
    targets = ["query", "value"]
    if method == "ttlora":
        return ttpeft.TTLoraConfig(target_modules=targets)
    if method == "loretta_rep":
        return ttpeft.LorettaRepConfig(target_modules=targets)
    if method == "loretta_adp":
        return ttpeft.LorettaAdpConfig()
    return LoraConfig(r=8, lora_alpha=16, target_modules=targets)


def rss_bytes() -> int:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed heap pages, so RSS tracks live memory
    except OSError:
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def adapter_param_bytes(model, name: str) -> tuple[int, int]:
    """(parameters, bytes) stored for adapter ``name``: its trains or LoRA matrices, biases, and its
    ``modules_to_save`` copies (the LoRETTA layer norms)."""
    params = [p for key, p in model.named_parameters() if f".{name}." in f".{key}."]
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def factor_cache_bytes(model) -> int:
    total = 0
    for module in model.modules():
        cache = getattr(module, "factor_cache", None)
        if cache is not None:
            total += sum(f.numel() * f.element_size() for entry in cache.entries.values() for f in entry.factors)
    return total


def timed(fn, repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def randomise(model) -> None:
    """Adapters away from their zero-update initialisation, as trained ones are."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.02)


def run_method(method: str, args, workdir: str) -> dict:
    print(f"== {method}", flush=True)
    saved = os.path.join(workdir, method)
    model = get_peft_model(AutoModel.from_pretrained(minilm_path()), adapter_config(method), adapter_name="a0")
    randomise(model)
    model.save_pretrained(saved)  # adapter_name "a0": saved under saved/a0
    saved = os.path.join(saved, "a0")
    disk_bytes = sum(os.path.getsize(os.path.join(saved, f)) for f in os.listdir(saved))
    del model

    base = AutoModel.from_pretrained(minilm_path()).eval()
    rss_base = rss_bytes()
    model = PeftModel.from_pretrained(base, saved, adapter_name="s0").eval()
    params, param_bytes = adapter_param_bytes(model, "s0")
    rss_one = rss_bytes()
    load_times = []
    for i in range(1, args.adapters):
        start = time.perf_counter()
        model.load_adapter(saved, adapter_name=f"s{i}")
        load_times.append(time.perf_counter() - start)
    rss_all = rss_bytes()
    rss_per_adapter = (rss_all - rss_one) / (args.adapters - 1)
    names = [f"s{i}" for i in range(args.adapters)]
    print(f"   {params:,} params, {param_bytes / 1024:.1f} KiB/adapter in parameters; RSS +{rss_per_adapter / 1024:.1f} "
          f"KiB/adapter; load {statistics.median(load_times) * 1000:.1f} ms", flush=True)

    generator = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size

    def batch(rows: int) -> dict:
        ids = torch.randint(1000, vocab, (rows, args.seq), generator=generator)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    # Switch latency: every switch goes to an adapter that is not the current one; the forward right
    # after it (factors rebuilt) is compared with a second forward on the same adapter (factors cached).
    one = batch(1)
    switch_s, first_forward_s, second_forward_s = [], [], []
    with torch.no_grad():
        model.set_adapter(names[0])
        timed(lambda: model(**one), 1, warmup=2)
        cache_bytes = factor_cache_bytes(model)
        for k in range(args.switches):
            name = names[(k * 7 + 1) % len(names)]
            if name == model.active_adapter:
                name = names[(k * 7 + 2) % len(names)]
            start = time.perf_counter()
            model.set_adapter(name)
            switched = time.perf_counter()
            model(**one)
            first = time.perf_counter()
            model(**one)
            switch_s.append(switched - start)
            first_forward_s.append(first - switched)
            second_forward_s.append(time.perf_counter() - first)
    rebuild_s = statistics.median(f - s for f, s in zip(first_forward_s, second_forward_s))
    print(f"   set_adapter {statistics.median(switch_s) * 1000:.2f} ms; first forward after it "
          f"{statistics.median(first_forward_s) * 1000:.2f} ms vs {statistics.median(second_forward_s) * 1000:.2f} ms "
          f"for the next (1 x {args.seq} tokens)", flush=True)

    # Mixed-adapter batches; the variants are interleaved so load from other processes hits them alike.
    full = batch(args.batch)
    variants = {"base": None, "one_adapter": None}
    variants.update({f"mixed_{count}_adapters": [names[i % count] for i in range(args.batch)]
                     for count in args.mixed})
    model.set_adapter(names[0])

    def forward(variant) -> float:
        """Seconds of the forward alone (peft's disable_adapter() itself visits every loaded adapter)."""
        row_names = variants[variant]
        kwargs = {} if row_names is None else {"adapter_names": row_names}
        with model.disable_adapter() if variant == "base" else contextlib.nullcontext():
            start = time.perf_counter()
            model(**full, **kwargs)
            return time.perf_counter() - start

    times = {variant: [] for variant in variants}
    with torch.no_grad():
        for variant in variants:
            forward(variant)
        for _ in range(args.repeats):
            for variant in variants:
                times[variant].append(forward(variant))
    batch_s = {variant: statistics.median(t) for variant, t in times.items()}
    print("   batch forward: " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in batch_s.items()), flush=True)
    del model, base
    gc.collect()
    return {
        "method": method, "adapter_params": params, "adapter_param_bytes": param_bytes, "adapter_disk_bytes": disk_bytes,
        "adapters_per_gib_from_params": 2 ** 30 / param_bytes,
        "rss_base_model_bytes": rss_base, "rss_growth_per_adapter_bytes": rss_per_adapter,
        "adapters_per_gib_from_rss": 2 ** 30 / rss_per_adapter if rss_per_adapter > 0 else None,
        "factor_cache_bytes_active_adapter": cache_bytes,
        "load_adapter_s_median": statistics.median(load_times), "load_adapter_s_all": load_times,
        "set_adapter_s_median": statistics.median(switch_s),
        "first_forward_after_switch_s_median": statistics.median(first_forward_s),
        "next_forward_s_median": statistics.median(second_forward_s),
        "factor_rebuild_after_switch_s_median": rebuild_s,
        "batch_forward_s": batch_s,
        "mixed_over_one_adapter": {k: v / batch_s["one_adapter"] for k, v in batch_s.items() if k.startswith("mixed")},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--adapters", type=int, default=100, help="adapters loaded at once")
    parser.add_argument("--switches", type=int, default=60)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--mixed", type=int, nargs="+", default=[1, 4, 16, 32], help="distinct adapters per batch")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", default=os.path.join(HERE, "results_minilm.json"))
    args = parser.parse_args(argv)
    import peft
    import transformers

    torch.set_num_threads(args.threads)
    start = time.time()
    with tempfile.TemporaryDirectory() as workdir:
        results = [run_method(method, args, workdir) for method in args.methods]
    payload = {
        "benchmark": "serving many adapters on one base", "model": "MiniLM (all-MiniLM-L6-v2, 6 layers, 384 wide)",
        "adapters_loaded": args.adapters, "switches": args.switches, "batch": args.batch, "seq": args.seq,
        "repeats": args.repeats,
        "note": "CPU timings on a shared 2-core machine with another benchmark running: compare methods within "
                "this run, not absolute numbers",
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers.__version__, "peft": peft.__version__,
                        "ttpeft": ttpeft.__version__, "cpu_threads": torch.get_num_threads(),
                        "cpus": os.cpu_count()},
        "command": "python3 benchmarks/serving/serving.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "wall_s": time.time() - start, "results": results,
    }
    with open(args.out, "w") as f:
        json.dump(payload, f, indent=1)
    print(f"wrote {args.out} ({payload['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
