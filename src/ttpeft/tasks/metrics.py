"""The benchmarks' official metrics, computed with scikit-learn and scipy."""

from __future__ import annotations

from collections import defaultdict
from typing import Optional, Sequence

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

METRICS = ("accuracy", "f1", "macro_f1", "mcc", "pearson", "spearman", "f1a", "em", "mse")
REGRESSION_METRICS = ("pearson", "spearman", "mse")


def compute_metrics(names: Sequence[str], predictions, references, groups: Optional[Sequence] = None) -> dict:
    """``{name: value}`` for each metric; ``groups`` (one id per example) is needed by ``em``."""
    preds, refs = np.asarray(predictions), np.asarray(references)
    results = {}
    for name in names:
        if name == "accuracy":
            value = accuracy_score(refs, preds)
        elif name in ("f1", "f1a"):  # binary F1 of the positive class (MultiRC's F1a is over all answers)
            value = f1_score(refs, preds, average="binary", pos_label=1, zero_division=0)
        elif name == "macro_f1":
            value = f1_score(refs, preds, average="macro", zero_division=0)
        elif name == "mcc":
            value = matthews_corrcoef(refs, preds)
        elif name in ("pearson", "spearman"):
            # a constant prediction has no correlation; report 0 rather than NaN
            if np.std(preds) == 0 or np.std(refs) == 0:
                value = 0.0
            else:
                value = (pearsonr if name == "pearson" else spearmanr)(preds, refs)[0]
        elif name == "mse":
            value = float(np.mean((preds.astype(float) - refs.astype(float)) ** 2))
        elif name == "em":
            value = _exact_match_by_group(preds, refs, groups)
        else:
            raise ValueError(f"unknown metric {name!r}; valid metrics: {', '.join(METRICS)}")
        results[name] = float(value)
    return results


def _exact_match_by_group(preds, refs, groups) -> float:
    """Fraction of groups (MultiRC questions) whose every answer is classified correctly."""
    if groups is None:
        raise ValueError("metric 'em' needs a group id per example")
    correct = defaultdict(lambda: True)
    for pred, ref, group in zip(preds, refs, groups):
        correct[group] &= bool(pred == ref)
    return float(np.mean(list(correct.values()))) if correct else 0.0
