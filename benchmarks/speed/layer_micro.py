"""One adapted linear layer, forward + backward: LoRA vs TT-LoRA's three contraction strategies.

Calibrates and checks the ``auto`` cost model: for each (width, rank, tokens) the fastest measured
strategy is recorded next to the one ``auto`` picks.

    python benchmarks/speed/layer_micro.py --device cuda --out benchmarks/speed/results/layer_micro_gpu.json
"""

from __future__ import annotations

import argparse

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from common import environment, median_time, write_json

import ttpeft
from ttpeft.contraction import choose_strategy


def layer_model(width: int, method: str, rank: int, device: str, dtype):
    base = nn.Sequential(nn.Linear(width, width, bias=False)).to(device, dtype)
    if method == "lora":
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["0"])
    else:
        config = ttpeft.TTLoraConfig(target_modules=["0"], tt_rank=rank, init="random", contraction=method)
    return get_peft_model(base, config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--widths", nargs="+", type=int, default=[768, 2048, 4096, 8192])
    parser.add_argument("--ranks", nargs="+", type=int, default=[2, 4, 8, 16])
    parser.add_argument("--tokens", nargs="+", type=int, default=[128, 2048, 16384])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    rows = []
    for width in args.widths:
        for rank in args.ranks:
            models = {m: layer_model(width, m, rank, args.device, dtype)
                      for m in ("lora", "split", "reconstruct", "sequential")}
            layer = models["split"].base_model.model[0]
            core_shapes = [tuple(c.shape) for c in layer.ttlora_cores["default"]]
            num_row_cores = len(layer.ttlora_shape["default"][0])
            for tokens in args.tokens:
                x = torch.randn(tokens, width, device=args.device, dtype=dtype, requires_grad=True)
                timings = {}
                for method, model in models.items():
                    def step():
                        model(x).sum().backward()
                    timings[method] = median_time(step, args.device, 3, args.repeats)[0]
                fastest = min(("split", "reconstruct", "sequential"), key=timings.get)
                picked = choose_strategy(core_shapes, num_row_cores, tokens, args.device,
                                         torch.finfo(dtype).bits // 8)
                rows.append({"width": width, "rank": rank, "tokens": tokens, "tt_shape": core_shapes,
                             **{f"{m}_s": t for m, t in timings.items()}, "fastest": fastest, "auto_picks": picked})
                print(f"w={width:5d} r={rank:2d} T={tokens:6d} " +
                      " ".join(f"{m}={t / timings['lora']:.2f}x" for m, t in timings.items() if m != "lora") +
                      f" fastest={fastest} auto={picked}", flush=True)
            del models
    write_json(args.out, {"environment": environment(), "device": args.device, "rows": rows})


if __name__ == "__main__":
    main()
