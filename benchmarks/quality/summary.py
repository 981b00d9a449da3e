"""Summary of a quality grid: summary.md (mean ± std over seeds) and one PNG per task.

    python benchmarks/quality/summary.py --results benchmarks/quality/results/results.jsonl
    python benchmarks/quality/summary.py --results ... --tasks sst2,stsb,cb,rte --seeds 0 --out-dir ...  # a subset
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from grid import rate_beyond_edge  # noqa: E402  (the search's own edge rule)
# Table and legend order; variants not listed here follow in name order.
VARIANT_ORDER = ["zero_shot", "head", "full", "lora_r8", "lora_r1", "ttlora", "loretta_rep", "loretta_adp",
                 "ttlora_10x", "ttlora_10x_bal", "ttlora_10x_ln", "ttlora_10x_ffn", "ttlora_10x_qv_ffn",
                 "ttlora_10x_ffn_ln_r1", "loretta_rep_10x", "loretta_rep_10x_ln", "loretta_rep_10x_ffn_ln",
                 "loretta_rep_10x_ffn_ln_a4", "loretta_adp_10x", "loretta_adp_10x_norm", "loretta_adp_10x_norm_wn",
                 "loretta_adp_10x_ln", "loretta_adp_10x_ln_wn", "loretta_adp_10x_ffn_ln_par_lnlr_1e2", "ttlora_100x",
                 "loretta_rep_100x", "vera", "fourierft", "fourierft_10x", "fourierft_100x", "vblora", "vblora_10x",
                 "vblora_100x", "tinylora", "lokr", "ia3", "ia3_10x", "ln_tuning", "ln_tuning_10x"]
REFERENCE = "lora_r8"  # the target compares each tensor-train variant with it
# The tensor-train variants in VARIANT_ORDER: marked in tables and compared with LoRA r=8 and their rivals.
OURS = tuple(v for v in VARIANT_ORDER if v.startswith(("ttlora", "loretta_")))
MARKERS = "osD^v<>pP*XhH8d"


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def select_rows(rows: list[dict], source: Path | str, tasks: Optional[str] = None, seeds: Optional[str] = None,
                methods: Optional[str] = None) -> list[dict]:
    """The rows of the comma-separated ``tasks``, ``seeds`` and method variants (None: all of them)."""
    for option, key, text in (("--tasks", "task", tasks), ("--seeds", "seed", seeds),
                              ("--methods", "variant", methods)):
        if not text:
            continue
        wanted = {part.strip() for part in text.split(",") if part.strip()}
        unknown = sorted(wanted - {str(row[key]) for row in rows})
        if unknown:
            raise SystemExit(f"{option} {text}: no runs with {key} {', '.join(unknown)} in {source}")
        rows = [row for row in rows if str(row[key]) in wanted]
    return rows


def variant_rank(name: str):
    return (VARIANT_ORDER.index(name), name) if name in VARIANT_ORDER else (len(VARIANT_ORDER), name)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def head_params_by_task(rows: list[dict]) -> dict:
    """The classifier head's size per task (the same for every variant; rows from before it was recorded
    lack it)."""
    return {row["task"]: row["head_params"] for row in rows if row.get("head_params") is not None}


def last_row_per_seed(rows: list[dict]) -> dict:
    """(task, variant, seed) -> its last row: a rerun of a seed replaces the earlier one."""
    return {(row["task"], row["variant"], row["seed"]): row for row in rows}


def aggregate(rows: list[dict]) -> dict:
    """(task, variant) -> headline metric values, params, lrs, steps. The last row of a seed wins."""
    by_seed = last_row_per_seed(rows)
    heads = head_params_by_task(rows)
    cells = defaultdict(lambda: {"values": [], "params": [], "lrs": set(), "steps": [], "metric": None,
                                 "adapter_bytes": [], "adapter_params": []})
    for (task, variant, _), row in by_seed.items():
        cell = cells[(task, variant)]
        metric = row["headline_metric"]
        cell["metric"] = metric
        cell["values"].append(100.0 * row["metrics"][metric])  # points, as papers report them
        cell["params"].append(row["trainable_params"])
        if task in heads and row["variant"] != "head":
            cell["adapter_params"].append(row["trainable_params"] - heads[task])
        cell["adapter_bytes"].append(row["adapter_bytes"])
        cell["lrs"].add(row["lr"])
        cell["steps"].append(row["steps"])
    return cells


def _run_count(rows: list[dict]) -> str:
    used = len(last_row_per_seed(rows))
    replaced = len(rows) - used
    return f"{used} runs" + (f"; {replaced} earlier runs of the same seeds replaced" if replaced else "")


def sources_label(paths: list[Path]) -> str:
    """How the summary names its results files: by file name, or folder and name where two names are alike."""
    names = [path.name for path in paths]
    if len(set(names)) < len(names):
        names = [f"{path.parent.name}/{path.name}" for path in paths]
    return " + ".join(names)


def write_markdown(cells: dict, rows: list[dict], out: Path, source: Path | str, has_average: bool = False) -> None:
    tasks = sorted({task for task, _ in cells})
    variants = sorted({variant for _, variant in cells}, key=variant_rank)
    caps = sorted({json.dumps({k: r["config"][k] for k in ("max_train_samples", "max_eval_samples", "epochs")},
                              sort_keys=True) for r in rows})
    has_head = any(r.get("head_params") for r in rows)  # a causal LM scores label words: no head
    head_note = ("Trainable parameters include the classifier head." if has_head
                 else "No classifier head: the model scores each label word after a prompt.")
    label = source if isinstance(source, str) else source.name
    lines = [f"# Quality grid summary", "",
             f"From `{label}` ({_run_count(rows)}). Metric: the task's headline metric ×100, "
             f"mean ± std over seeds (n = seeds). {head_note}", "",
             "Caps and epochs of these runs: " + "; ".join(f"`{c}`" for c in caps), ""]
    held_out = sorted({r["config"]["on_holdout"] for r in rows if r["config"].get("on_holdout")})
    if held_out:
        lines += [f"Scores on a slice of {', '.join(map(str, held_out))} rows held out from the train split "
                  "(`--on-holdout`), not on the validation split.", ""]
    header = ("| method | trainable params | adapter params (no head) | adapter bytes | lr | " + " | ".join(tasks)
              + " | average |")
    lines += [header, "|" + "---|" * (6 + len(tasks))]
    averages, adapter_sizes = {}, {}
    for variant in variants:
        present = [cells[(t, variant)] for t in tasks if (t, variant) in cells]
        params = sorted({p for c in present for p in c["params"]})
        sizes = sorted({b for c in present for b in c["adapter_bytes"]})
        lrs = sorted({lr for c in present for lr in c["lrs"] if lr is not None})
        entries, means = [], []
        for task in tasks:
            cell = cells.get((task, variant))
            if cell is None:
                entries.append("–")
                continue
            mean, std = mean_std(cell["values"])
            means.append(mean)
            entries.append(f"{mean:.1f} ± {std:.1f} (n={len(cell['values'])})")
        adapter = sorted({p for c in present for p in c["adapter_params"]})
        if adapter:
            adapter_sizes[variant] = max(adapter)
        if len(means) == len(tasks):
            averages[variant] = statistics.fmean(means)
        average = f"{averages[variant]:.1f}" if variant in averages else "– (missing tasks)"
        lines.append(f"| {variant} | {'/'.join(f'{p:,}' for p in params)} | "
                     f"{'/'.join(f'{p:,}' for p in adapter) or '–'} | "
                     f"{'/'.join(f'{b:,}' for b in sizes)} | {'/'.join(f'{lr:g}' for lr in lrs) or '–'} | "
                     + " | ".join(entries) + f" | {average} |")
    lines += target_lines(averages, adapter_sizes)
    lines += paired_lines(rows, tasks, averages, adapter_sizes)
    lines += lr_selection_lines(rows)
    metrics = {task: next(c["metric"] for (t, _), c in cells.items() if t == task) for task in tasks}
    lines += ["", "Metrics: " + ", ".join(f"{t}: {m}" for t, m in metrics.items())]
    if has_head:
        lines += ["Trainable parameters differ per task only through the classifier head (number of labels)."]
    lines += [""]
    lines += ["![average](average.png)"] if has_average else []
    lines += [f"![{task}]({task.replace('/', '_')}.png)" for task in tasks]
    out.write_text("\n".join(lines) + "\n")


def target_lines(averages: dict, adapter_sizes: dict) -> list[str]:
    """The issue's target: average within 1.0 point of LoRA r=8 with at least 10x fewer adapter parameters."""
    if REFERENCE not in averages or REFERENCE not in adapter_sizes:
        return []
    lines = ["", f"Against {REFERENCE} (average {averages[REFERENCE]:.1f}, {adapter_sizes[REFERENCE]:,} adapter "
             "parameters; target: within 1.0 point with at least 10x fewer):", "",
             "| method | average − lora_r8 | fewer adapter parameters | target met |", "|---|---|---|---|"]
    for variant in sorted(averages, key=variant_rank):
        if variant == REFERENCE or variant not in adapter_sizes or adapter_sizes[variant] == 0:
            continue
        gap = averages[variant] - averages[REFERENCE]
        ratio = adapter_sizes[REFERENCE] / adapter_sizes[variant]
        met = "yes" if gap >= -1.0 and ratio >= 10 else "no"
        name = f"**{variant}**" if variant in OURS else variant
        lines.append(f"| {name} | {gap:+.1f} | {ratio:.1f}x | {met} |")
    return lines


def seed_averages(rows: list[dict], variant: str, tasks: list[str]) -> dict:
    """seed -> the variant's average over ``tasks`` (×100), for the seeds it ran on every task (last row wins)."""
    values = defaultdict(dict)
    for (task, name, seed), row in last_row_per_seed(rows).items():
        if name == variant:
            values[seed][task] = 100.0 * row["metrics"][row["headline_metric"]]
    return {seed: statistics.fmean(by_task[t] for t in tasks) for seed, by_task in values.items()
            if all(t in by_task for t in tasks)}


def paired_difference(rows: list[dict], variant: str, other: str, tasks: list[str]) -> Optional[tuple]:
    """(mean, 95% CI low, high, n) of ``variant``'s average minus ``other``'s, paired by seed (a seed fixes
    the data order and the head's initialisation for every method); None with fewer than two shared seeds."""
    from scipy import stats

    mine, theirs = seed_averages(rows, variant, tasks), seed_averages(rows, other, tasks)
    diffs = [mine[seed] - theirs[seed] for seed in sorted(set(mine) & set(theirs))]
    if len(diffs) < 2:
        return None
    interval = stats.ttest_1samp(diffs, 0.0).confidence_interval(0.95)
    return statistics.fmean(diffs), float(interval.low), float(interval.high), len(diffs)


def paired_lines(rows: list[dict], tasks: list[str], averages: dict, adapter_sizes: dict) -> list[str]:
    """Each of our variants against LoRA r=8 and against the best other method of at most twice its adapter
    size, as a mean difference over seeds with a t-interval: whether the seeds resolve the target."""
    ours = [v for v in sorted(averages, key=variant_rank) if v in OURS and v in adapter_sizes]
    lines = []
    for variant in ours:
        rivals = [v for v in averages if v not in OURS and v != REFERENCE and 0 < adapter_sizes.get(v, 0)
                  <= 2 * adapter_sizes[variant]]
        cells = []
        for other in [REFERENCE] + ([max(rivals, key=averages.get)] if rivals else []):
            diff = paired_difference(rows, variant, other, tasks)
            cells.append(f"{other}: {diff[0]:+.1f} [{diff[1]:+.1f}, {diff[2]:+.1f}] (n={diff[3]})" if diff
                         else f"{other}: –")
        lines.append(f"| **{variant}** | " + " | ".join(cells + ["–"] * (2 - len(cells))) + " |")
    if not lines:
        return []
    return ["", "Paired by seed: the difference of the average over tasks, mean and 95% t-interval over the seeds "
            "both ran on every task. Best rival: the highest average among the other methods with at most twice "
            "the adapter parameters.", "", "| method | − lora_r8 | − best rival at its budget |",
            "|---|---|---|"] + lines


def lr_selection_lines(rows: list[dict]) -> list[str]:
    """Per run chosen on the held-out slice (`--lr-grid`): its score at each rate, the rate chosen and the
    validation score that rate reached. The last row of a seed wins, as in the tables."""
    chosen = {key: r for key, r in last_row_per_seed(rows).items() if r.get("lr_selection")}
    if not chosen:
        return []
    lines = ["", "Learning rates chosen on the held-out train slice: held-out score at each rate → rate chosen → "
             "validation score (×100).", "", "| task | method | seed | held-out rows | held out | chosen | validation |",
             "|---|---|---|---|---|---|---|"]
    edges = 0
    for (task, variant, seed), row in sorted(chosen.items(), key=lambda kv: (kv[0][0], variant_rank(kv[0][1]),
                                                                             kv[0][2])):
        selection = row["lr_selection"]
        scores = " / ".join(f"{float(lr):g}: {100 * score:.1f}"
                            for lr, score in sorted(selection["held_out_scores"].items(), key=lambda kv: float(kv[0])))
        value = 100 * row["metrics"][row["headline_metric"]]
        edge = grid_edge(selection)
        edges += bool(edge)
        notes = [edge] if edge else []
        if "best_held_out" in selection:  # grid.py --lr-off-cliff stepped down from the best rate
            notes.append(f"below {selection['best_held_out']:g}, whose neighbour above never trained")
        note = f" ({'; '.join(notes)})" if notes else ""
        lines.append(f"| {task} | {variant} | {seed} | {selection['held_out_samples']} | {scores} | "
                     f"{selection['chosen']:g}{note} | {value:.1f} |")
    if edges:
        lines += ["", f"{edges} of {len(chosen)} choices are at the top or bottom of the grid and strictly better "
                  "than the other rates there: the best rate may lie beyond the grid."]
    return lines


def grid_edge(selection: dict) -> str:
    """'top' or 'bottom' when the chosen rate is the grid's highest or lowest and strictly the best: where
    `grid.py --lr-extend` would try a further rate."""
    scores = {float(lr): score for lr, score in selection["held_out_scores"].items()}
    if len(scores) < 2:
        return ""
    beyond = rate_beyond_edge(scores)
    return "" if beyond is None else "top" if beyond > float(selection["chosen"]) else "bottom"


def plot_task(task: str, cells: dict, out: Path) -> None:
    variants = sorted({v for t, v in cells if t == task}, key=variant_rank)
    points = {}
    for variant in variants:
        cell = cells[(task, variant)]
        points[variant] = (statistics.fmean(cell["params"]), *mean_std(cell["values"]))
    metric = cells[(task, variants[0])]["metric"]
    plot_points(points, "trainable parameters (log scale)", f"{metric} ×100",
                f"{task}: metric vs trainable parameters", out)


def plot_average(cells: dict, out: Path) -> bool:
    """Average over tasks against adapter parameters (head excluded), for variants run on every task."""
    tasks = sorted({t for t, _ in cells})
    points = {}
    for variant in sorted({v for _, v in cells}, key=variant_rank):
        present = [cells.get((t, variant)) for t in tasks]
        if any(c is None or not c["adapter_params"] for c in present):  # head-only runs have none
            continue
        means = [mean_std(c["values"])[0] for c in present]
        points[variant] = (max(p for c in present for p in c["adapter_params"]), statistics.fmean(means), 0.0)
    if len(points) < 2:
        return False
    plot_points(points, "adapter parameters, head excluded (log scale)", "average metric ×100",
                f"average over {', '.join(tasks)}", out)
    return True


def plot_points(points: dict, xlabel: str, ylabel: str, title: str, out: Path) -> None:
    import matplotlib  # only the plots need it (the `bench` extra)

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for variant, (params, mean, std) in points.items():
        i = variant_rank(variant)[0]
        if params <= 0:  # nothing trained (zero-shot): a level, not a point on the log axis
            ax.axhline(mean, linestyle="--", color="grey", label=f"{variant} (no training)")
            continue
        ax.errorbar([params], [mean], yerr=[std], marker=MARKERS[i % len(MARKERS)], markersize=8,
                    linestyle="none", capsize=3, label=variant,
                    color=plt.cm.tab20(i % 20))  # default cycle repeats after ten methods
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", nargs="+", default=[str(HERE / "results" / "results.jsonl")],
                        help="results files, read in order: a later file's run of a task, variant and seed "
                        "replaces an earlier one (reruns of some cells at another rate, say)")
    parser.add_argument("--out-dir", default=None, help="default: the first results file's folder")
    parser.add_argument("--tasks", default=None, help="comma-separated tasks to summarise (default: every task "
                        "in the results file); the average is over these")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds to summarise (default: all)")
    parser.add_argument("--methods", default=None, help="comma-separated method variants to summarise (default: "
                        "all); keep lora_r8 for the comparison with it")
    args = parser.parse_args(argv)
    sources = [Path(path) for path in args.results]
    source = sources[0] if len(sources) == 1 else sources_label(sources)
    out_dir = Path(args.out_dir) if args.out_dir else sources[0].parent
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = select_rows([row for path in sources for row in read_rows(path)], source, args.tasks, args.seeds,
                       args.methods)
    if not rows:
        raise SystemExit(f"no runs in {source}")
    cells = aggregate(rows)
    for task in sorted({t for t, _ in cells}):
        plot_task(task, cells, out_dir / f"{task.replace('/', '_')}.png")
    has_average = plot_average(cells, out_dir / "average.png")
    write_markdown(cells, rows, out_dir / "summary.md", source, has_average)
    print(f"wrote {out_dir / 'summary.md'} and {len({t for t, _ in cells})} plot(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
