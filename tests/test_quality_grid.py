"""The accuracy-per-parameter benchmark's scripts: variant arguments, resuming, and the summary's arithmetic."""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import pytest

from ttpeft.cli import build_parser

QUALITY = Path(__file__).resolve().parents[1] / "benchmarks" / "quality"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"quality_{name}", QUALITY / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


grid = load_script("grid")
summary = load_script("summary")


@pytest.mark.parametrize("variant", [v for v in grid.METHODS if v != "zero_shot"])
@pytest.mark.parametrize("causal", [False, True])
def test_every_variant_is_a_valid_train_command(variant, causal):
    if causal and variant in grid.ENCODER_ONLY:
        pytest.skip("encoder-only variant")
    method, extra = grid.method_args(variant, causal)
    args = build_parser().parse_args(["train", "--method", method, *extra])
    assert args.method == method


def test_causal_variants_rename_encoder_modules():
    _, extra = grid.method_args("lora_r8", causal=True)
    assert extra[extra.index("--target-modules") + 1] == "q_proj,v_proj"


@pytest.mark.parametrize("variant, causal_targets", [
    ("loretta_adp_10x_ffn", "down_proj"),
    ("ttlora_10x_ffn", "gate_proj,up_proj,down_proj"),
    ("ttlora_10x_qv_ffn", "q_proj,v_proj,gate_proj,up_proj,down_proj"),
])
def test_causal_variants_rename_the_feed_forward_regexes(variant, causal_targets):
    _, extra = grid.method_args(variant, causal=True)
    assert extra[extra.index("--target-modules") + 1] == causal_targets


def variant_method_and_fields(variant: str):
    """The encoder variant's method and the config fields `ttpeft train` gives it."""
    from ttpeft.methods import get_method, method_config_fields

    method_name, extra = grid.method_args(variant, causal=False)
    method = get_method(method_name)
    return method, method_config_fields(method, vars(build_parser().parse_args(["train", "--method", method_name, *extra])))


def minilm_with_variant(variant: str):
    """MiniLM (two labels) with the variant applied as `ttpeft train` would."""
    from transformers import AutoModelForSequenceClassification

    from ttpeft import training
    from ttpeft.models import minilm_path

    method, fields = variant_method_and_fields(variant)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    model, _ = training.apply_method(model, method, fields, training.ENCODER)
    return model


@functools.cache  # lora_r8's count is the reference of every parametrised case: build it once
def minilm_adapter_params(variant: str) -> int:
    """Trainable parameters of the variant on MiniLM (two labels), classifier head excluded."""
    from ttpeft import training

    model = minilm_with_variant(variant)
    return training.count_parameters(model)[0] - training.count_head_parameters(model)


@pytest.mark.parametrize("variant, adapted", [
    ("ttlora_10x_ffn", ("intermediate.dense", "output.dense")),
    ("ttlora_10x_qv_ffn", ("attention.self.query", "attention.self.value", "intermediate.dense", "output.dense")),
])
def test_feed_forward_variants_adapt_the_feed_forward_block_and_not_the_attention_output(variant, adapted):
    from ttpeft.tuners.ttlora.layer import TTLoraLayer

    names = [name for name, module in minilm_with_variant(variant).named_modules() if isinstance(module, TTLoraLayer)]
    suffixes = sorted({name.split(".layer.")[1].split(".", 1)[1] for name in names})
    assert suffixes == sorted(adapted) and len(names) == 6 * len(adapted)


@pytest.mark.parametrize("variant, rank", [("ttlora_10x_ffn_ln", 2), ("ttlora_10x_ffn_ln_r1", 1)])
def test_feed_forward_variants_with_norms_train_the_block_at_one_rank_and_its_six_output_norms(variant, rank):
    from ttpeft.tuners.ttlora.layer import TTLoraLayer

    model = minilm_with_variant(variant)
    trained = {name.split(".layer.")[1].split(".", 1)[1].split(".ttlora_cores")[0].split(".modules_to_save")[0]
               for name, param in model.named_parameters() if param.requires_grad and ".layer." in name}
    assert trained == {"intermediate.dense", "output.dense", "output.LayerNorm"}  # no attention norm
    trains = [list(module.ttlora_cores["default"]) for module in model.modules() if isinstance(module, TTLoraLayer)]
    assert len(trains) == 12
    assert {core.shape[-1] for cores in trains for core in cores[:-1]} == {rank}  # every inner bond


def test_bias_free_adapters_train_no_bias_and_give_the_budget_to_the_trains():
    def adapter_params(variant):
        return {name: param.numel() for name, param in minilm_with_variant(variant).named_parameters()
                if param.requires_grad and "classifier" not in name}

    bias_free, published = adapter_params("loretta_adp_10x_nobias"), adapter_params("loretta_adp_10x")
    assert bias_free and not [name for name in bias_free if "bias" in name]
    assert 0.95 * 7000 < sum(bias_free.values()) <= 7000
    published_trains = sum(n for name, n in published.items() if "bias" not in name)
    assert sum(bias_free.values()) > 4 * published_trains


@pytest.mark.parametrize("variant, field, value", [
    ("loretta_adp_10x_norm_ref", "init", "reference"),
    ("loretta_adp_10x_norm_gelu", "non_linearity", "gelu"),
    ("loretta_adp_10x_norm_linear", "non_linearity", "linear"),
    ("loretta_adp_10x_norm_wn", "weight_norm", True),
])
def test_ablations_of_the_normalised_adapter_change_only_their_one_field(variant, field, value):
    # what each setting does to the model is tested with the layer (test_loretta_adp.py)
    from ttpeft import LorettaAdpConfig

    method, ablation = variant_method_and_fields(variant)
    normalised = variant_method_and_fields("loretta_adp_10x_norm")[1]
    normalised_value = normalised.pop(field, getattr(LorettaAdpConfig(), field))  # absent: the config's default
    assert method.name == "loretta_adp" and ablation.pop(field) == value != normalised_value
    assert ablation == normalised


def test_bias_free_adapter_with_norms_and_weight_norm_changes_only_weight_norm():
    method, with_weight_norm = variant_method_and_fields("loretta_adp_10x_ln_wn")
    without = variant_method_and_fields("loretta_adp_10x_ln")[1]
    assert method.name == "loretta_adp" and with_weight_norm.pop("weight_norm") is True
    assert "weight_norm" not in without and with_weight_norm == without


@pytest.mark.parametrize("variant", [v for v in grid.METHODS if "_10x" in v])
def test_10x_variants_train_at_most_a_tenth_of_lora_r8_on_minilm(variant, monkeypatch):
    if variant in grid.PROBE_VARIANTS:
        from probe_helpers import patched_apply_method

        patched_apply_method(monkeypatch, *grid.PROBE_VARIANTS[variant])
    adapter = minilm_adapter_params(variant)
    assert 0.6 * 7000 < adapter <= minilm_adapter_params("lora_r8") / 10


@pytest.mark.parametrize("variant", [v for v in grid.METHODS if "_100x" in v])
def test_100x_variants_train_about_a_hundredth_of_lora_r8_on_minilm(variant):
    # a budget of 737 (lora_r8 / 100); the rivals may reach TinyLoRA's fixed default, 768, and no further
    adapter = minilm_adapter_params(variant)
    assert 0.9 * 737 < adapter <= 768


def grid_argv(tmp_path: Path, *more: str) -> list[str]:
    # a data folder without parquet files: step counts come from the known split sizes
    return ["--tasks", "cb,stsb", "--methods", "lora_r8,ttlora_10x", "--seeds", "0,1",
            "--data-dir", str(tmp_path / "no-data"), "--max-train-samples", "100", "--epochs", "1",
            "--batch-size", "10", "--results", str(tmp_path / "results.jsonl"), *more]


def finished_row(tmp_path: Path, task: str, variant: str, seed: int, **changed) -> dict:
    args = grid.parse_args(grid_argv(tmp_path))
    args.causal = False
    for name, value in changed.items():
        setattr(args, name, value)
    return {"task": task, "variant": variant, "config": grid.run_config(variant, args), "seed": seed,
            "model": "minilm", "steps": 10, "train_runtime_s": 5.0}


def test_dry_run_skips_finished_runs(tmp_path, capsys):
    rows = [finished_row(tmp_path, "cb", "lora_r8", 0),
            finished_row(tmp_path, "stsb", "ttlora_10x", 1),
            finished_row(tmp_path, "cb", "ttlora_10x", 0, epochs=2.0)]  # another config: not the same run
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    assert grid.main(grid_argv(tmp_path, "--dry-run")) == 0
    out = capsys.readouterr().out
    assert "6 runs to do, 2 already in" in out
    assert "cb     lora_r8      seed 1" in out
    assert "cb     lora_r8      seed 0" not in out
    assert "cb     ttlora_10x   seed 0" in out
    assert "stsb   ttlora_10x   seed 1" not in out
    assert "    10 steps" in out  # 100 samples at batch 10, 1 epoch


def test_dry_run_refuses_unknown_variants(tmp_path):
    with pytest.raises(SystemExit, match="unknown task or method: lora_r3"):
        grid.main(grid_argv(tmp_path, "--dry-run", "--methods", "lora_r3"))


def test_dry_run_plans_every_variant_and_the_default_grid_leaves_out_the_ablations(tmp_path, capsys):
    every = ",".join(v for v in grid.METHODS if v != "zero_shot")
    assert grid.main(grid_argv(tmp_path, "--dry-run", "--methods", every, "--seeds", "0")) == 0
    assert grid.main(grid_argv(tmp_path, "--dry-run", "--methods", "", "--seeds", "0")) == 0
    every_plan, default_plan = capsys.readouterr().out.split("runs to do")[1:]
    for ablation in grid.ABLATIONS:
        assert ablation in every_plan and ablation not in default_plan
    assert "loretta_adp_10x " in default_plan


def summary_row(variant: str, task: str, seed: int, value: float, params: int, head: int = 5) -> dict:
    return {"task": task, "variant": variant, "seed": seed, "headline_metric": "accuracy",
            "metrics": {"accuracy": value}, "trainable_params": params + head, "head_params": head,
            "adapter_bytes": 4 * params, "lr": 1e-3, "steps": 10,
            "config": {"max_train_samples": 100, "max_eval_samples": None, "epochs": 1.0}}


def test_summary_means_over_seeds_and_last_row_of_a_seed_wins():
    rows = [summary_row("lora_r8", "cb", 0, 0.50, 1000),
            summary_row("lora_r8", "cb", 0, 0.60, 1000),  # a rerun of seed 0 replaces the first
            summary_row("lora_r8", "cb", 1, 0.80, 1000)]
    cell = summary.aggregate(rows)[("cb", "lora_r8")]
    assert sorted(cell["values"]) == pytest.approx([60.0, 80.0])
    mean, std = summary.mean_std(cell["values"])
    assert mean == pytest.approx(70.0) and std == pytest.approx(14.142, abs=1e-3)
    assert cell["adapter_params"] == [1000, 1000]


def test_summary_of_several_results_files_lets_a_later_files_run_replace_the_same_seed(tmp_path):
    first, reruns = tmp_path / "results.jsonl", tmp_path / "reruns.jsonl"
    first.write_text("".join(json.dumps(row) + "\n" for row in (
        summary_row("lora_r8", "cb", 0, 0.50, 1000), summary_row("lora_r8", "cb", 1, 0.70, 1000))))
    reruns.write_text(json.dumps(summary_row("lora_r8", "cb", 1, 0.90, 1000)) + "\n")
    out = tmp_path / "out"
    assert summary.main(["--results", str(first), str(reruns), "--out-dir", str(out)]) == 0
    text = (out / "summary.md").read_text()
    assert "From `results.jsonl + reruns.jsonl` (2 runs; 1 earlier runs of the same seeds replaced)" in text
    assert "| lora_r8 |" in text and "70.0 ± 28.3 (n=2)" in text  # seeds 0 and 1 (rerun): 50 and 90
    selected = json.loads(first.read_text().splitlines()[1])
    selected["lr_selection"] = {"chosen": 1e-3, "from": "train split", "held_out_samples": 50,
                                "held_out_scores": {"0.001": 0.7}}
    first.write_text(first.read_text().splitlines()[0] + "\n" + json.dumps(selected) + "\n")
    summary.main(["--results", str(first), str(reruns), "--out-dir", str(out)])
    assert "held-out train slice" not in (out / "summary.md").read_text()  # the rerun replaced the chosen row
    summary.main(["--results", str(first), "--out-dir", str(out)])
    assert "| cb | lora_r8 | 1 | 50 | 0.001: 70.0 | 0.001 | 70.0 |" in (out / "summary.md").read_text()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "results.jsonl").write_text(reruns.read_text())  # the same file name in another folder
    summary.main(["--results", str(first), str(tmp_path / "other" / "results.jsonl"), "--out-dir", str(out)])
    assert f"From `{tmp_path.name}/results.jsonl + other/results.jsonl` (2 runs;" in (out / "summary.md").read_text()


@pytest.mark.parametrize("head", [5, None])
def test_summary_says_whether_a_head_is_counted_and_which_rows_are_held_out(tmp_path, head):
    rows = [summary_row("lora_r8", "cb", 0, 0.5, 1000, head=head or 0)]
    rows[0]["head_params"] = head
    rows[0]["config"]["on_holdout"] = 50
    summary.write_markdown(summary.aggregate(rows), rows, tmp_path / "summary.md", tmp_path / "results.jsonl")
    text = (tmp_path / "summary.md").read_text()
    assert ("include the classifier head" in text) == bool(head)
    assert ("No classifier head" in text) == (head is None)
    assert "slice of 50 rows held out from the train split" in text


def test_summary_lists_each_held_out_lr_choice_with_the_rate_it_led_to(tmp_path):
    rows = [summary_row("lora_r8", "cb", 0, 0.5, 1000), summary_row("ttlora_10x", "cb", 0, 0.7, 100)]
    rows[1]["lr"] = 0.01
    rows[1]["lr_selection"] = {"chosen": 0.01, "from": "train split", "held_out_samples": 50,
                               "held_out_scores": {"0.01": 0.74, "0.0025": 0.72, "0.005": 0.7}}
    summary.write_markdown(summary.aggregate(rows), rows, tmp_path / "summary.md", tmp_path / "results.jsonl")
    lines = (tmp_path / "summary.md").read_text().splitlines()
    selected = [line for line in lines if line.startswith("| cb |")]
    assert selected == ["| cb | ttlora_10x | 0 | 50 | 0.0025: 72.0 / 0.005: 70.0 / 0.01: 74.0 | 0.01 (top) | 70.0 |"]
    assert "1 of 1 choices are at the top or bottom of the grid" in "\n".join(lines)
    rows.pop()
    summary.write_markdown(summary.aggregate(rows), rows, tmp_path / "summary.md", tmp_path / "results.jsonl")
    assert "held-out train slice" not in (tmp_path / "summary.md").read_text()


def test_summary_of_a_subset_averages_over_its_tasks_and_seeds_only(tmp_path):
    rows = [summary_row("lora_r8", "cb", 0, 0.50, 1000), summary_row("lora_r8", "stsb", 0, 0.90, 1000),
            summary_row("lora_r8", "cb", 1, 0.70, 1000),
            summary_row("vera", "cb", 0, 0.70, 100)]  # vera has no stsb run: no average over both tasks
    source = tmp_path / "results.jsonl"
    summary.write_markdown(summary.aggregate(rows), rows, tmp_path / "all.md", source)
    assert "– (missing tasks)" in (tmp_path / "all.md").read_text()

    def averages(subset: list[dict]) -> dict:
        summary.write_markdown(summary.aggregate(subset), subset, tmp_path / "subset.md", source)
        found = {}  # from the first table (the second one lists the target's verdicts)
        for line in (tmp_path / "subset.md").read_text().splitlines():
            if line.startswith(("| lora_r8 |", "| vera |")):
                found.setdefault(line.split("|")[1].strip(), line.split("|")[-2].strip())
        return found

    assert averages(summary.select_rows(rows, source, tasks="cb")) == {"lora_r8": "60.0", "vera": "70.0"}
    assert averages(summary.select_rows(rows, source, tasks="cb", seeds="0")) == {"lora_r8": "50.0", "vera": "70.0"}
    with pytest.raises(SystemExit, match="no runs with task rte"):
        summary.select_rows(rows, source, tasks="cb,rte")
    with pytest.raises(SystemExit, match="no runs with seed 2"):
        summary.select_rows(rows, source, seeds="2")
    assert averages(summary.select_rows(rows, source, tasks="cb", methods="vera")) == {"vera": "70.0"}
    with pytest.raises(SystemExit, match="no runs with variant lokr"):
        summary.select_rows(rows, source, methods="vera,lokr")


@pytest.mark.parametrize("scores, chosen, edge", [
    ({"0.0025": 0.72, "0.005": 0.70, "0.01": 0.74}, 0.01, "top"),
    ({"0.0025": 0.75, "0.005": 0.70, "0.01": 0.74}, 0.0025, "bottom"),
    ({"0.0025": 0.70, "0.005": 0.75, "0.01": 0.74}, 0.005, ""),
    ({"0.0025": 0.60, "0.005": 0.60, "0.01": 0.60}, 0.0025, ""),  # a tie is no evidence beyond the grid
])
def test_a_choice_at_the_grid_edge_is_flagged_only_when_strictly_best(scores, chosen, edge):
    assert summary.grid_edge({"held_out_scores": scores, "chosen": chosen}) == edge


def test_target_needs_both_the_gap_and_the_ratio():
    averages = {"lora_r8": 70.0, "ttlora_10x": 69.2, "loretta_rep_10x": 68.5, "lora_r1": 69.9}
    sizes = {"lora_r8": 10000, "ttlora_10x": 900, "loretta_rep_10x": 900, "lora_r1": 2000}
    verdicts = {line.split("|")[1].strip().strip("*"): line.split("|")[4].strip()
                for line in summary.target_lines(averages, sizes) if line.startswith("| ") and "x |" in line}
    assert verdicts == {"ttlora_10x": "yes", "loretta_rep_10x": "no", "lora_r1": "no"}


def write_split(folder: Path, task: str, split: str, sentences: list[str]) -> None:
    import pandas as pd

    target = folder / grid.TASKS[task] / task
    target.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"premise": sentences, "hypothesis": sentences, "label": [0] * len(sentences)}).to_parquet(
        target / f"{split}.parquet", index=False)


def test_lr_selection_trains_on_a_held_out_train_slice_picks_the_best_and_resumes(tmp_path, monkeypatch):
    data = tmp_path / "data"
    write_split(data, "cb", "train", [f"train {i}" for i in range(50)])
    write_split(data, "cb", "validation", [f"reported {i}" for i in range(20)])
    args = grid.parse_args(grid_argv(tmp_path, "--data-dir", str(data), "--lr-grid", "--holdout-samples", "8",
                                     "--runs-dir", str(tmp_path / "runs")))
    args.causal = False
    best = grid.default_lr("ttlora") * 2.0
    calls = []

    def fake_train_once(task, variant, seed, args, data_dir, output_dir, lr=None, **_):
        calls.append((data_dir, lr))
        output_dir.mkdir(parents=True)
        result = {"metrics": {"accuracy": 1.0 - abs(lr - best)}, "headline_metric": "accuracy"}
        (output_dir / "results.json").write_text(json.dumps(result))
        return result

    monkeypatch.setattr(grid, "train_once", fake_train_once)
    chosen, scores, _ = grid.choose_lr("cb", "ttlora_10x", 0, args)
    assert chosen == pytest.approx(best) and len(scores) == len(grid.LR_MULTIPLIERS)
    [data_dir] = {d for d, _ in calls}
    split = Path(data_dir) / "super_glue" / "cb"
    held_out = pd_column(split / "validation.parquet")
    trained = pd_column(split / "train.parquet")
    assert len(held_out) == 8 and not held_out & trained  # cb keeps at least 4/5 of its 50 rows for training
    assert held_out | trained == {f"train {i}" for i in range(50)}  # the reported split is never used
    assert grid.held_out_rows("cb", 0, args) == 8

    calls.clear()
    assert grid.choose_lr("cb", "ttlora_10x", 0, args)[0] == pytest.approx(best)
    assert calls == []  # finished selection runs are read back, not rerun
    args.holdout_samples = 9
    grid.choose_lr("cb", "ttlora_10x", 0, args)
    assert len(calls) == len(grid.LR_MULTIPLIERS)  # another held-out size is another selection
    args.holdout_samples = 20
    assert grid.held_out_rows("cb", 0, args) == 10  # the row records the 1/5 of the train split used


@pytest.mark.parametrize("scores, beyond", [
    ({0.01: 0.5, 0.02: 0.6, 0.04: 0.7}, 0.08),  # best at the top: twice the top
    ({0.01: 0.7, 0.02: 0.6, 0.04: 0.5}, 0.005),  # best at the bottom: half the bottom
    ({0.01: 0.5, 0.02: 0.7, 0.04: 0.6}, None),  # inside the grid
    ({0.01: 0.7, 0.02: 0.7, 0.04: 0.5}, None),  # a tie at the bottom is not strictly best
])
def test_the_rate_beyond_the_edge_is_tried_only_past_a_strictly_best_edge(scores, beyond):
    assert grid.rate_beyond_edge(scores) == beyond


def fake_held_out_training(peak: float, calls: list):
    """A train_once whose held-out score falls with the distance (in octaves) from ``peak``."""
    import math

    def train_once(task, variant, seed, args, data_dir, output_dir, lr=None, **_):
        calls.append(lr)
        result = {"method": "ttlora", "model": "minilm", "method_config": {}, "trainable_params": 1,
                  "total_params": 2, "adapter_bytes": 3, "metrics": {"accuracy": 1.0 - abs(math.log2(lr / peak)) / 10},
                  "headline_metric": "accuracy", "settings": {"lr": lr}, "train": {"steps": 1, "train_runtime_s": 0.1},
                  "wall_time_s": 0.2, "num_train_examples": 40, "num_eval_examples": 10, "data": data_dir,
                  "command": "ttpeft train"}
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "results.json").write_text(json.dumps(result))
        return result

    return train_once


@pytest.mark.parametrize("extend, peak_multiplier, tried, chosen_multiplier", [
    (0, 8.0, 3, 2.0),  # the plain grid stops at its top
    (1, 8.0, 4, 4.0),
    (2, 8.0, 5, 8.0),
    (2, 4.0, 5, 4.0),  # x8 is tried and is worse: x4 stays
    (3, 4.0, 5, 4.0),  # ... and the search stops there
    (2, 0.25, 5, 0.25),  # downwards: x0.25 wins, x0.125 is tried and loses
])
def test_lr_extend_walks_past_the_edge_until_the_best_rate_is_inside(tmp_path, monkeypatch, extend, peak_multiplier,
                                                                      tried, chosen_multiplier):
    data = tmp_path / "data"
    write_split(data, "cb", "train", [f"train {i}" for i in range(50)])
    args = grid.parse_args(grid_argv(tmp_path, "--data-dir", str(data), "--lr-grid", "--lr-extend", str(extend),
                                     "--runs-dir", str(tmp_path / "runs")))
    args.causal = False
    default = grid.default_lr("ttlora")
    calls = []
    monkeypatch.setattr(grid, "train_once", fake_held_out_training(default * peak_multiplier, calls))
    chosen, scores, _ = grid.choose_lr("cb", "ttlora_10x", 0, args)
    assert len(calls) == tried and len(scores) == tried
    assert chosen == pytest.approx(default * chosen_multiplier)


@pytest.mark.parametrize("never_trained, chosen", [
    ([0.04], 0.01),  # the rate above the best never trained: one below it
    ([], 0.02),
    ([0.01], 0.02),  # a failed rate below the best changes nothing
    ([0.01, 0.02, 0.04], 0.02),  # no rate trained: no cliff to step off
])
def test_a_best_rate_next_to_one_that_never_trained_gives_way_to_the_rate_below(never_trained, chosen):
    assert grid.rate_below_cliff(0.02, [0.01, 0.02, 0.04], never_trained) == chosen
    assert grid.rate_below_cliff(0.01, [0.01, 0.02], [0.02]) == 0.01  # nothing below: the best stays


def test_lr_off_cliff_trains_below_a_best_rate_whose_neighbour_never_trained_and_records_why(tmp_path, monkeypatch):
    data = tmp_path / "data"
    write_split(data, "cb", "train", [f"train {i}" for i in range(50)])
    write_split(data, "cb", "validation", [f"reported {i}" for i in range(20)])
    default = grid.default_lr("ttlora")
    calls = []
    score_by_peak = fake_held_out_training(default, calls)

    def train_once(task, variant, seed, args, data_dir, output_dir, lr=None, **kwargs):
        result = score_by_peak(task, variant, seed, args, data_dir, output_dir, lr=lr, **kwargs)
        result["train"]["loss_fell"] = lr < default * 1.5  # the top rate never trains
        (output_dir / "results.json").write_text(json.dumps(result))
        return result

    monkeypatch.setattr(grid, "train_once", train_once)
    results = tmp_path / "off-cliff.jsonl"
    argv = grid_argv(tmp_path, "--data-dir", str(data), "--tasks", "cb", "--methods", "ttlora_10x", "--seeds", "0",
                     "--lr-grid", "--lr-off-cliff", "--runs-dir", str(tmp_path / "runs"), "--results", str(results))
    assert grid.main(argv) == 0
    [row] = grid.read_rows(results)
    assert row["lr"] == pytest.approx(default / 2) and calls[-1] == pytest.approx(default / 2)  # validation run
    assert row["lr_selection"]["best_held_out"] == pytest.approx(default)
    assert row["lr_selection"]["never_trained"] == pytest.approx([default * 2])
    assert row["config"]["lr_off_cliff"] is True
    summary.write_markdown(summary.aggregate([row]), [row], tmp_path / "summary.md", results)
    assert f"| {default / 2:g} (below {default:g}, whose neighbour above never trained) |" in (
        tmp_path / "summary.md").read_text()
    # further seeds at the rate the search took (it is not the best held-out one)
    more = grid_argv(tmp_path, "--data-dir", str(data), "--tasks", "cb", "--methods", "ttlora_10x", "--seeds", "1",
                     "--lr-from", str(results), "--runs-dir", str(tmp_path / "runs"), "--results", str(results))
    assert grid.main(more) == 0
    assert grid.read_rows(results)[-1]["lr"] == pytest.approx(default / 2) and calls[-1] == pytest.approx(default / 2)
    with pytest.raises(SystemExit, match="--lr-off-cliff acts on the --lr-grid search"):
        grid.main(grid_argv(tmp_path, "--lr-off-cliff"))


def test_reuse_from_takes_recorded_held_out_scores_and_copies_a_row_whose_rate_still_wins(tmp_path, monkeypatch):
    data = tmp_path / "data"
    write_split(data, "cb", "train", [f"train {i}" for i in range(50)])
    write_split(data, "cb", "validation", [f"reported {i}" for i in range(20)])
    earlier_path, wide = tmp_path / "earlier.jsonl", tmp_path / "wide.jsonl"

    def argv(methods: str, results: Path, *more: str) -> list[str]:
        return grid_argv(tmp_path, "--data-dir", str(data), "--tasks", "cb", "--methods", methods, "--seeds", "0",
                         "--lr-grid", "--runs-dir", str(tmp_path / "runs"), "--results", str(results), *more)

    calls = []
    # the earlier grid: lora_r8's best rate is inside its grid, ttlora_10x's at the top
    monkeypatch.setattr(grid, "train_once", fake_held_out_training(grid.default_lr("lora"), calls))
    assert grid.main(argv("lora_r8", earlier_path)) == 0
    monkeypatch.setattr(grid, "train_once", fake_held_out_training(grid.default_lr("ttlora") * 4, calls))
    assert grid.main(argv("ttlora_10x", earlier_path)) == 0
    import shutil

    shutil.rmtree(tmp_path / "runs" / "lr")  # the earlier selection runs are gone: only their rows remain
    calls.clear()
    wider = ("--lr-extend", "2", "--reuse-from", str(earlier_path))
    assert grid.main(argv("lora_r8,ttlora_10x", wide, *wider)) == 0
    lora_row, ttlora_row = grid.read_rows(wide)
    ttlora_default = grid.default_lr("ttlora")
    # lora_r8: nothing trained, the earlier row copied under the new key; ttlora_10x: x4 and x8 held out, then
    # the validation run at x4
    assert calls == pytest.approx([ttlora_default * 4, ttlora_default * 8, ttlora_default * 4])
    assert lora_row["reused_from"] == str(earlier_path) and lora_row["config"]["lr_extend"] == 2
    assert lora_row["lr"] == grid.read_rows(earlier_path)[0]["lr"]
    assert "reused_from" not in ttlora_row and ttlora_row["lr"] == pytest.approx(ttlora_default * 4)
    assert len(ttlora_row["lr_selection"]["held_out_scores"]) == 5
    # run again: both are done
    calls.clear()
    assert grid.main(argv("lora_r8,ttlora_10x", wide, *wider)) == 0
    assert calls == [] and len(grid.read_rows(wide)) == 2
    # an extended file serves as the earlier one too: every rate it tried is recorded, its copies included
    assert grid.main(argv("lora_r8,ttlora_10x", tmp_path / "wider.jsonl", "--lr-extend", "3",
                          "--reuse-from", str(wide))) == 0
    assert calls == [] and [r["lr"] for r in grid.read_rows(tmp_path / "wider.jsonl")] == [r["lr"] for r in
                                                                                            grid.read_rows(wide)]


@pytest.mark.parametrize("recorded, extend, runs", [
    (None, 2, 4),  # three held-out runs and the validation run
    ({"0.01": 0.5, "0.02": 0.7, "0.04": 0.6}, 2, 0),  # recorded, inside the grid: the row is copied
    ({"0.01": 0.5, "0.02": 0.6, "0.04": 0.7}, 2, 2),  # at the edge: one more rate and a validation run
    ({"0.01": 0.5, "0.02": 0.6, "0.04": 0.7}, 0, 0),
])
def test_the_plan_counts_only_the_trainings_a_cell_still_needs(tmp_path, recorded, extend, runs):
    args = grid.parse_args(grid_argv(tmp_path, "--lr-grid", "--lr-extend", str(extend)))
    earlier = {"lr_selection": {"held_out_scores": recorded}} if recorded else None
    assert grid.planned_runs("ttlora_10x", earlier, args) == runs


def test_lr_from_trains_more_seeds_at_the_rate_the_lowest_seed_chose(tmp_path, monkeypatch):
    def grid_row(variant: str, seed: int, lr: float, **changed) -> dict:
        row = finished_row(tmp_path, "cb", variant, seed, lr_grid=True, **changed)
        return {**row, "lr": lr, "lr_selection": {"chosen": lr, "held_out_scores": {str(lr): 0.9}}}

    earlier = tmp_path / "earlier.jsonl"
    earlier.write_text("".join(json.dumps(r) + "\n" for r in [
        grid_row("ttlora_10x", 1, 0.02), grid_row("ttlora_10x", 0, 0.01),
        grid_row("lora_r8", 0, 0.004, epochs=2.0)]))  # other caps: not this grid's rate
    calls = []
    monkeypatch.setattr(grid, "train_once", fake_held_out_training(0.01, calls))
    argv = grid_argv(tmp_path, "--tasks", "cb", "--methods", "ttlora_10x", "--seeds", "2,3", "--lr-from", str(earlier))
    assert grid.main(argv) == 0
    assert calls == [0.01, 0.01]
    rows = grid.read_rows(tmp_path / "results.jsonl")
    assert [r["config"]["lr_from"] for r in rows] == [{"lr": 0.01, "seed": 0}] * 2
    assert [r["lr"] for r in rows] == [0.01, 0.01] and all(r["lr_selection"] is None for r in rows)
    with pytest.raises(SystemExit, match="no --lr-grid row of cb lora_r8 with these caps"):
        grid.main(grid_argv(tmp_path, "--tasks", "cb", "--methods", "lora_r8", "--lr-from", str(earlier)))
    with pytest.raises(SystemExit, match="not with --lr-grid"):
        grid.main(argv + ["--lr-grid"])


@pytest.mark.parametrize("more, message", [
    (["--lr-extend", "2"], "add --lr-grid"),
    (["--lr-grid", "--lr-extend", "-1"], "extra rates >= 0"),
    (["--reuse-from", "x.jsonl"], "add --lr-grid"),
])
def test_lr_extend_and_reuse_from_refuse_what_they_cannot_do(tmp_path, more, message):
    with pytest.raises(SystemExit, match=message):
        grid.main(grid_argv(tmp_path, *more))


def test_reuse_from_refuses_the_results_file_itself(tmp_path):
    with pytest.raises(SystemExit, match="the results file itself"):
        grid.main(grid_argv(tmp_path, "--data-dir", str(tmp_path), "--lr-grid",
                            "--reuse-from", str(tmp_path / "results.jsonl")))


def test_on_holdout_runs_report_on_the_held_out_slice_with_their_own_key(tmp_path, monkeypatch):
    data = tmp_path / "data"
    write_split(data, "cb", "train", [f"train {i}" for i in range(50)])
    write_split(data, "cb", "validation", [f"reported {i}" for i in range(20)])
    plain = grid.parse_args(grid_argv(tmp_path, "--data-dir", str(data)))
    plain.causal = False
    calls = []

    def fake_train_once(task, variant, seed, args, data_dir, output_dir, lr=None, **_):
        calls.append((data_dir, lr))
        return {"method": "ttlora", "model": "minilm", "method_config": {}, "trainable_params": 1,
                "total_params": 2, "adapter_bytes": 3, "metrics": {"accuracy": 0.5}, "headline_metric": "accuracy",
                "settings": {"lr": lr}, "train": {"steps": 1, "train_runtime_s": 0.1, "loss_fell": False},
                "wall_time_s": 0.2, "num_train_examples": 40, "num_eval_examples": 10, "data": data_dir,
                "command": "ttpeft train"}

    monkeypatch.setattr(grid, "train_once", fake_train_once)
    argv = grid_argv(tmp_path, "--data-dir", str(data), "--tasks", "cb", "--methods", "ttlora_10x", "--seeds", "0",
                     "--on-holdout", "--holdout-samples", "8", "--lr", "0.02", "--runs-dir", str(tmp_path / "runs"))
    assert grid.main(argv) == 0
    [(data_dir, lr)] = calls
    assert lr == 0.02 and Path(data_dir) != data
    held_out = pd_column(Path(data_dir) / "super_glue" / "cb" / "validation.parquet")
    assert len(held_out) == 8 and held_out <= {f"train {i}" for i in range(50)}  # never the validation split
    [row] = grid.read_rows(tmp_path / "results.jsonl")
    assert row["config"]["on_holdout"] == 8 and row["config"]["fixed_lr"] == 0.02
    assert row["loss_fell"] is False  # the run's own verdict on whether it learned
    assert "on_holdout" not in grid.run_config("ttlora_10x", plain)  # earlier rows keep their resume keys
    with pytest.raises(SystemExit, match="--lr-grid"):
        grid.main(argv + ["--lr-grid"])


@pytest.mark.parametrize("flag", ["--lr-grid", "--on-holdout"])
def test_a_held_out_slice_needs_a_parquet_folder(tmp_path, flag):
    with pytest.raises(SystemExit, match=f"{flag} needs a parquet --data-dir"):
        grid.main(grid_argv(tmp_path, "--data-dir", "embedded", flag))


def pd_column(path: Path) -> set:
    import pandas as pd

    return set(pd.read_parquet(path)["premise"])


def test_summary_pairs_seeds_and_intervals_the_difference_of_the_task_averages(tmp_path):
    ours = {0: (0.70, 0.80), 1: (0.60, 0.90), 2: (0.75, 0.85)}  # seed -> (cb, stsb)
    lora_gap = {0: 0.02, 1: 0.04, 2: 0.00}  # lora_r8 is ahead by this much on both tasks of a seed
    rows = []
    for seed, (cb, stsb) in ours.items():
        rows += [summary_row("ttlora_10x", "cb", seed, cb, 100), summary_row("ttlora_10x", "stsb", seed, stsb, 100),
                 summary_row("lora_r8", "cb", seed, cb + lora_gap[seed], 1000),
                 summary_row("lora_r8", "stsb", seed, stsb + lora_gap[seed], 1000)]
    rows += [summary_row("lora_r8", "cb", 3, 0.10, 1000)]  # seed 3 lacks stsb: not paired
    mean, low, high, n = summary.paired_difference(rows, "ttlora_10x", "lora_r8", ["cb", "stsb"])
    assert n == 3 and mean == pytest.approx(-2.0)
    assert low < -4.0 and 0.0 < high  # three seeds, gaps 0-4 points: the interval spans zero
    assert summary.paired_difference(rows, "ttlora_10x", "lora_r8", ["cb", "rte"]) is None
    rows += [summary_row("ia3_10x", t, seed, 0.5, 150) for t in ("cb", "stsb") for seed in ours]
    summary.write_markdown(summary.aggregate(rows), rows, tmp_path / "summary.md", tmp_path / "results.jsonl")
    lines = (tmp_path / "summary.md").read_text().splitlines()
    line = next(x for x in lines if x.startswith("| **ttlora_10x** | lora"))
    assert "lora_r8: -2.0" in line and "ia3_10x: +26.7" in line
