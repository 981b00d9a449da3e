"""Where a training step's time goes: cProfile of a few steps, one method at a time.

In the small-batch regime a step is bound by the host (Python, kernel launches), so the profile shows
which of the adapter's Python work costs most.

    python benchmarks/speed/profile_step.py --device cuda --model llama-1b --tokens 1x512 --methods lora ttlora
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats

import torch
from peft import get_peft_model

from common import adapter_config, llama_model, median_time, set_grouping, sync


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="llama-1b")
    parser.add_argument("--tokens", default="1x512")
    parser.add_argument("--methods", nargs="+", default=["lora", "ttlora"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    torch.manual_seed(0)
    base = llama_model(args.model, args.device, torch.bfloat16 if args.device == "cuda" else torch.float32)
    batch, length = (int(v) for v in args.tokens.split("x"))
    ids = torch.randint(0, base.config.vocab_size, (batch, length), device=args.device)
    for method in args.methods:
        model = get_peft_model(base, adapter_config(method, "llama"))
        set_grouping(model, method)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step():
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        median = median_time(step, args.device, 3, args.steps)[0]
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.steps):
            step()
        sync(args.device)
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(args.top)
        print(f"=== {method}: median step {median * 1e3:.1f} ms ===")
        print(out.getvalue())
        model.unload()


if __name__ == "__main__":
    main()
