"""Summary of a quality grid: summary.md (mean ± std over seeds) and one PNG per task.

    python benchmarks/quality/summary.py --results benchmarks/quality/results/results.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
# Table and legend order; variants not listed here follow in name order.
VARIANT_ORDER = ["head", "full", "lora_r8", "lora_r1", "ttlora", "loretta_rep", "loretta_adp", "vera",
                 "fourierft", "vblora", "tinylora", "lokr", "ia3"]
MARKERS = "osD^v<>pP*XhH8d"


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def variant_rank(name: str):
    return (VARIANT_ORDER.index(name), name) if name in VARIANT_ORDER else (len(VARIANT_ORDER), name)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(rows: list[dict]) -> dict:
    """(task, variant) -> headline metric values, params, lrs, steps. The last row of a seed wins."""
    by_seed = {}
    for row in rows:
        by_seed[(row["task"], row["variant"], row["seed"])] = row
    cells = defaultdict(lambda: {"values": [], "params": [], "lrs": set(), "steps": [], "metric": None,
                                 "adapter_bytes": []})
    for (task, variant, _), row in by_seed.items():
        cell = cells[(task, variant)]
        metric = row["headline_metric"]
        cell["metric"] = metric
        cell["values"].append(100.0 * row["metrics"][metric])  # points, as papers report them
        cell["params"].append(row["trainable_params"])
        cell["adapter_bytes"].append(row["adapter_bytes"])
        cell["lrs"].add(row["lr"])
        cell["steps"].append(row["steps"])
    return cells


def write_markdown(cells: dict, rows: list[dict], out: Path, source: Path) -> None:
    tasks = sorted({task for task, _ in cells})
    variants = sorted({variant for _, variant in cells}, key=variant_rank)
    caps = sorted({json.dumps({k: r["config"][k] for k in ("max_train_samples", "max_eval_samples", "epochs")},
                              sort_keys=True) for r in rows})
    lines = [f"# Quality grid summary", "",
             f"From `{source.name}` ({len(rows)} runs). Metric: the task's headline metric ×100, "
             "mean ± std over seeds (n = seeds). Trainable parameters include the classifier head.", "",
             "Caps and epochs of these runs: " + "; ".join(f"`{c}`" for c in caps), ""]
    header = "| method | trainable params | adapter bytes | lr | " + " | ".join(tasks) + " | average |"
    lines += [header, "|" + "---|" * (5 + len(tasks))]
    for variant in variants:
        present = [cells[(t, variant)] for t in tasks if (t, variant) in cells]
        params = sorted({p for c in present for p in c["params"]})
        sizes = sorted({b for c in present for b in c["adapter_bytes"]})
        lrs = sorted({lr for c in present for lr in c["lrs"]})
        entries, means = [], []
        for task in tasks:
            cell = cells.get((task, variant))
            if cell is None:
                entries.append("–")
                continue
            mean, std = mean_std(cell["values"])
            means.append(mean)
            entries.append(f"{mean:.1f} ± {std:.1f} (n={len(cell['values'])})")
        average = f"{statistics.fmean(means):.1f}" if len(means) == len(tasks) else "– (missing tasks)"
        lines.append(f"| {variant} | {'/'.join(f'{p:,}' for p in params)} | "
                     f"{'/'.join(f'{b:,}' for b in sizes)} | {'/'.join(f'{lr:g}' for lr in lrs)} | "
                     + " | ".join(entries) + f" | {average} |")
    metrics = {task: next(c["metric"] for (t, _), c in cells.items() if t == task) for task in tasks}
    lines += ["", "Metrics: " + ", ".join(f"{t}: {m}" for t, m in metrics.items()),
              "Trainable parameters differ per task only through the classifier head (number of labels).", ""]
    lines += [f"![{task}]({task.replace('/', '_')}.png)" for task in tasks]
    out.write_text("\n".join(lines) + "\n")


def plot_task(task: str, cells: dict, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    variants = sorted({v for t, v in cells if t == task}, key=variant_rank)
    metric = None
    for i, variant in enumerate(variants):
        cell = cells[(task, variant)]
        metric = cell["metric"]
        mean, std = mean_std(cell["values"])
        params = statistics.fmean(cell["params"])
        ax.errorbar([params], [mean], yerr=[std], marker=MARKERS[i % len(MARKERS)], markersize=8,
                    linestyle="none", capsize=3, label=variant,
                    color=plt.cm.tab20(i % 20))  # default cycle repeats after ten methods
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(f"{metric} ×100")
    ax.set_title(f"{task}: metric vs trainable parameters")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=str(HERE / "results" / "results.jsonl"))
    parser.add_argument("--out-dir", default=None, help="default: the results file's folder")
    args = parser.parse_args(argv)
    source = Path(args.results)
    out_dir = Path(args.out_dir) if args.out_dir else source.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = read_rows(source)
    if not rows:
        raise SystemExit(f"no runs in {source}")
    cells = aggregate(rows)
    write_markdown(cells, rows, out_dir / "summary.md", source)
    for task in sorted({t for t, _ in cells}):
        plot_task(task, cells, out_dir / f"{task.replace('/', '_')}.png")
    print(f"wrote {out_dir / 'summary.md'} and {len({t for t, _ in cells})} plot(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
