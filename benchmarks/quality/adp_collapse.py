"""Does a LoRETTA_adp run that ends predicting the mean map every input to the same [CLS] vector, and do its
adapter biases cause it? For each saved STS-B run folder (``runs/quality/stsb-loretta_adp_10x-*``), with
the adapter as trained and with its up- or down-projection biases zeroed: Pearson on the first N validation
pairs, the std of the predictions, and the spread of the last layer's [CLS] vector across pairs (the norm
of its per-dimension std over the norm of its mean; near 0 means every pair looks the same).

    python benchmarks/quality/adp_collapse.py runs/quality/stsb-loretta_adp_10x-s*
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "src"))


def stsb_pair_batch(data_dir: str, pairs: int):
    """The first ``pairs`` STS-B validation pairs (a DataFrame) and their MiniLM token batch."""
    import pandas as pd
    from transformers import AutoTokenizer

    from ttpeft.models import minilm_path

    frame = pd.read_parquet(Path(data_dir) / "glue" / "stsb" / "validation.parquet").iloc[:pairs]
    batch = AutoTokenizer.from_pretrained(minilm_path())(
        list(frame.sentence1), list(frame.sentence2), truncation=True, max_length=128, padding=True,
        return_tensors="pt")
    return frame, batch


def cls_spread(cls) -> float:
    """Norm of the per-dimension std of [CLS] vectors (inputs x hidden) over the norm of their mean."""
    return float(cls.std(0).norm() / cls.mean(0).norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="saved STS-B LoRETTA_adp run folders (results.json + adapter)")
    parser.add_argument("--data-dir", default=str(REPO_ROOT.parent / "shared" / "data"))
    parser.add_argument("--pairs", type=int, default=400)
    args = parser.parse_args()

    import torch
    from peft import PeftModel
    from scipy.stats import pearsonr
    from transformers import AutoModelForSequenceClassification

    import ttpeft  # noqa: F401  (registers LoRETTA_adp with peft)
    from ttpeft.models import minilm_path

    val, batch = stsb_pair_batch(args.data_dir, args.pairs)

    def measure(folder: str, zeroed: str | None) -> str:
        base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=1)
        model = PeftModel.from_pretrained(base, folder).eval()
        with torch.no_grad():
            for name, param in model.named_parameters():
                if zeroed and zeroed in name:
                    param.zero_()
            out = model(**batch, output_hidden_states=True)
        cls = out.hidden_states[-1][:, 0]
        pred = out.logits[:, 0].numpy()
        return (f"pearson {100 * pearsonr(pred, val.label)[0]:5.1f}  prediction std {pred.std():.3f}  "
                f"[CLS] spread {cls_spread(cls):.3f}")

    print(f"first {len(val)} STS-B validation pairs")
    for folder in args.runs:
        results = json.loads((Path(folder) / "results.json").read_text())
        print(f"{Path(folder).name}: lr {results['settings']['lr']:g}, seed {results['settings']['seed']}, "
              f"validation pearson {100 * results['metrics']['pearson']:.1f}")
        for zeroed in (None, "loretta_adp_up_bias", "loretta_adp_down_bias"):
            print(f"  {'as trained' if zeroed is None else zeroed + ' = 0':28s} {measure(folder, zeroed)}")


if __name__ == "__main__":
    main()
