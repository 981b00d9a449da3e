"""Generation latency per token (batch 1, greedy): base model, LoRA and TT methods unmerged and merged.

    python benchmarks/speed/generation.py --device cuda --model llama-1b --out benchmarks/speed/results/generation_gpu.json
"""

from __future__ import annotations

import argparse
import copy

import torch
from peft import get_peft_model

from common import adapter_config, environment, llama_model, median_time, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="llama-1b")
    parser.add_argument("--methods", nargs="+", default=["lora", "ttlora", "loretta_rep", "loretta_adp"])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    base = llama_model(args.model, args.device, dtype).eval()
    prompt = torch.randint(0, base.config.vocab_size, (1, args.prompt_tokens), device=args.device)

    def per_token(model) -> float:
        def run():
            with torch.no_grad():
                model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                               max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
        return median_time(run, args.device, 1, args.repeats)[0] / args.new_tokens

    rows = [{"method": "base", "merged": None, "s_per_token": per_token(base)}]
    print(f"base {rows[-1]['s_per_token'] * 1e3:.2f} ms/token", flush=True)
    for method in args.methods:
        model = get_peft_model(copy.deepcopy(base), adapter_config(method, "llama")).eval()
        rows.append({"method": method, "merged": False, "s_per_token": per_token(model)})
        try:
            merged = model.merge_and_unload()
            rows.append({"method": method, "merged": True, "s_per_token": per_token(merged)})
        except ValueError as err:  # adapters with a non-linearity cannot merge
            rows.append({"method": method, "merged": True, "s_per_token": None, "error": str(err)})
        print(" ".join(f"{r['method']}{' merged' if r['merged'] else ''}="
                       f"{(r['s_per_token'] or float('nan')) * 1e3:.2f}ms" for r in rows[-2:]), flush=True)
        del model
    # The base again at the end: the first measurement of a process also pays for clocks ramping up.
    rows.append({"method": "base (again, last)", "merged": None, "s_per_token": per_token(base)})
    print(f"base again {rows[-1]['s_per_token'] * 1e3:.2f} ms/token", flush=True)
    write_json(args.out, {"environment": environment(), "device": args.device, "model": args.model,
                          "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "rows": rows})


if __name__ == "__main__":
    main()
