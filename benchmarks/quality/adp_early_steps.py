"""How a LoRETTA_adp run that never learns gets stuck: its first steps, probed.

Runs ``ttpeft train`` with the options given and, every ``--every`` steps up to ``--steps`` (then it stops),
prints on the first 32 STS-B validation pairs: the last logged training loss, the spread of the last
layer's [CLS] vector across the pairs (norm of its per-dimension std over the norm of its mean; near 0:
every pair looks the same), the std of the predictions, and for each adapter the norm of its output at
[CLS] over the norm of the dense output it is added to (whose norms it prints after the first step).

    python benchmarks/quality/adp_early_steps.py --lr 0.02 -- --task stsb --method loretta_adp \\
        --param-budget 7000 --train-layernorms false --seed 0 --epochs 3 --batch-size 16 \\
        --data-dir ../shared/data --max-train-samples 1000 --max-eval-samples 50 --output-dir runs/early
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from adp_collapse import cls_spread, stsb_pair_batch  # noqa: E402  (the same pairs and spread measure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--steps", type=int, default=45)
    parser.add_argument("--every", type=int, default=3)
    parser.add_argument("--data-dir", default=str(REPO_ROOT.parent / "shared" / "data"))
    parser.add_argument("train_args", nargs="+", help="`ttpeft train` options, after --")
    args = parser.parse_args()

    import torch
    import transformers
    from transformers import TrainerCallback

    from ttpeft.cli import main as ttpeft_main
    from ttpeft.tuners.loretta_adp import LorettaAdpLinear

    _, batch = stsb_pair_batch(args.data_dir, 32)

    class Probe(TrainerCallback):
        def on_step_end(self, train_args, state, control, model=None, **_):
            if state.global_step % args.every and state.global_step > 1:
                return
            ratios, dense_norms, hooks = [], [], []
            for module in model.modules():
                if isinstance(module, LorettaAdpLinear):
                    def record(layer, inputs, output):
                        dense = layer.base_layer(inputs[0])
                        dense_norms.append(float(dense[:, 0].norm(dim=-1).mean()))
                        ratios.append(float((output - dense)[:, 0].norm(dim=-1).mean()) / dense_norms[-1])
                    hooks.append(module.register_forward_hook(record))
            model.eval()
            with torch.no_grad():
                out = model(**batch, output_hidden_states=True)
            model.train()
            for hook in hooks:
                hook.remove()
            if state.global_step == 1:
                print("dense output norm at [CLS] " + " ".join(f"{n:.1f}" for n in dense_norms))
            cls = out.hidden_states[-1][:, 0]
            losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
            print(f"step {state.global_step:3d}  loss {losses[-1] if losses else float('nan'):5.2f}  "
                  f"[CLS] spread {cls_spread(cls):.3f}  "
                  f"prediction std {float(out.logits.std()):.3f}  adapter/dense "
                  + " ".join(f"{r:.2f}" for r in ratios), flush=True)
            if state.global_step >= args.steps:
                control.should_training_stop = True

    # `ttpeft train` builds its Trainer inside; this adds the probe (and logs every step) as it starts.
    original_train = transformers.Trainer.train

    def train_with_probe(trainer, *a, **k):
        trainer.add_callback(Probe())
        trainer.args.logging_steps = 1
        return original_train(trainer, *a, **k)

    transformers.Trainer.train = train_with_probe
    print("adapters in module order (layer 0 attention output, layer 0 FFN output, layer 1 ...)")
    ttpeft_main(["train", *args.train_args, "--lr", str(args.lr), "--overwrite", "--no-progress"])


if __name__ == "__main__":
    main()
