"""The ttpeft command line: help, user mistakes, and the main job end to end on the real MiniLM."""

import json
import subprocess
import sys

import pytest

from ttpeft.cli import build_parser, main
from ttpeft.methods import METHOD_OPTIONS


def _run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "ttpeft", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_help_lists_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    for action in train._actions:
        if action.option_strings and action.dest != "help":
            assert action.option_strings[-1] in text
    for flag in ("--task", "--method", "--epochs", "--lr", "--batch-size", "--max-length", "--seed",
                 "--max-train-samples", "--max-eval-samples", "--output-dir", "--data-dir", "--tt-rank", "--tt-shape",
                 "--r", "--bottleneck-size", "--tensor-rank", "--method-config"):
        assert flag in text
    help_lines = " ".join(text.split())
    assert "(default: ttlora)" in help_lines and "(default: sst2)" in help_lines and "tt-rank" in help_lines
    assert help_lines.count("(default:") >= len(METHOD_OPTIONS) + 15
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "run_dir" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["train", "--task", "sst3"], "unknown task 'sst3'"),
    (["train", "--method", "lorax"], "unknown method 'lorax'"),
    (["train", "--model", "/no/such/model"], "model path /no/such/model does not exist"),
    (["train", "--max-length", "0"], "--max-length: must be > 0"),
    (["train", "--tt-rank", "x"], "--tt-rank"),
    (["train", "--bottleneck-size", "8"], "--bottleneck-size does not apply to method 'ttlora'"),
    (["train", "--task", "cola", "--data-dir", "/no/such/dir"], "data folder /no/such/dir does not exist"),
    (["eval", "/no/such/run"], "not a ttpeft run folder"),
    (["eval", "--model", "minilm"], "zero-shot evaluation needs a causal LM"),
    (["train", "--method-config", "/no/such.yaml"], "method config file /no/such.yaml does not exist"),
])
def test_user_mistakes_are_one_line_errors_with_a_non_zero_exit(args, message, capsys):
    try:
        code = main(args + (["--no-progress"] if args[0] == "train" else []))
    except SystemExit as exit_info:  # argparse's own checks
        code = exit_info.code
    err = capsys.readouterr().err
    assert code != 0
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_method_options_parse_into_config_fields(tmp_path):
    from ttpeft.methods import get_method, method_config_fields, read_config_file

    config_file = tmp_path / "ttlora.yaml"
    config_file.write_text("tt_rank: 4\nalpha: 16\n")
    args = build_parser().parse_args(["train", "--tt-shape", "8,8,6|6,8,8", "--tt-rank", "3,4,5,4,3",
                                      "--factors-per-side", "2", "--method-config", str(config_file)])
    fields = method_config_fields(get_method(args.method), vars(args), read_config_file(args.method_config))
    assert fields == {"tt_shape": [[8, 8, 6], [6, 8, 8]], "tt_rank": [3, 4, 5, 4, 3], "factors_per_side": 2,
                      "alpha": 16}


def test_tensor_cores_option_sets_the_loretta_field():
    from ttpeft.methods import get_method, method_config_fields

    for method in ("loretta_rep", "loretta_adp"):
        args = build_parser().parse_args(["train", "--method", method, "--tensor-cores", "2"])
        assert method_config_fields(get_method(method), vars(args), {}) == {"tensor_cores": 2}


@pytest.mark.parametrize("text, expected", [
    ("query,value", ["query", "value"]),
    ("all-linear", "all-linear"),
    (r".*layer\.\d+\.output\.dense", r".*layer\.\d+\.output\.dense"),  # one pattern, commas and all
    (r".*\.(query|value)", r".*\.(query|value)"),
])
def test_target_modules_take_names_or_one_regex(text, expected):
    from ttpeft.methods import get_method, method_config_fields

    args = build_parser().parse_args(["train", "--method", "loretta_adp", "--target-modules", text])
    assert method_config_fields(get_method("loretta_adp"), vars(args), {}) == {"target_modules": expected}


@pytest.mark.parametrize("option, field", [("--input-adapter-modules", "input_adapter_modules"),
                                           ("--parallel-adapter-modules", "parallel_adapter_modules")])
def test_adapter_placement_options_reach_the_loretta_adp_config(option, field):
    from ttpeft.methods import get_method, method_config_fields

    args = build_parser().parse_args(["train", "--method", "loretta_adp", "--target-modules", "intermediate.dense",
                                      option, "intermediate.dense"])
    assert method_config_fields(get_method("loretta_adp"), vars(args), {}) == {
        "target_modules": ["intermediate.dense"], field: ["intermediate.dense"]}


@pytest.mark.parametrize("option, field", [("--normalize-input", "normalize_input"), ("--weight-norm", "weight_norm")])
def test_loretta_adp_switches_reach_its_config(option, field):
    from ttpeft.methods import get_method, method_config_fields

    args = build_parser().parse_args(["train", "--method", "loretta_adp", option, "true"])
    assert method_config_fields(get_method("loretta_adp"), vars(args), {}) == {field: True}


def test_layernorm_modules_option_reaches_both_loretta_configs():
    from ttpeft.cli import build_parser
    from ttpeft.methods import get_method, method_config_fields

    for method in ("loretta_rep", "loretta_adp"):
        args = build_parser().parse_args(["train", "--method", method, "--layernorm-modules",
                                          r".*layer\.\d+\.output\.LayerNorm"])
        assert method_config_fields(get_method(method), vars(args), {}) == {
            "layernorm_modules": r".*layer\.\d+\.output\.LayerNorm"}
    args = build_parser().parse_args(["train", "--method", "loretta_rep", "--layernorm-modules", "a.LayerNorm,b"])
    assert method_config_fields(get_method("loretta_rep"), vars(args), {}) == {
        "layernorm_modules": ["a.LayerNorm", "b"]}


def test_modules_to_save_option_takes_name_endings_and_refuses_a_pattern(capsys):
    from ttpeft.cli import build_parser
    from ttpeft.methods import get_method, method_config_fields

    for method in ("ttlora", "lora", "ia3"):
        args = build_parser().parse_args(["train", "--method", method, "--modules-to-save",
                                          "layer.0.output.LayerNorm, layer.1.output.LayerNorm"])
        assert method_config_fields(get_method(method), vars(args), {}) == {
            "modules_to_save": ["layer.0.output.LayerNorm", "layer.1.output.LayerNorm"]}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--method", "ttlora", "--modules-to-save", r".*output\.LayerNorm"])
    assert "matches name endings, not a regex" in capsys.readouterr().err


def test_a_regex_target_adapts_only_the_modules_it_matches_in_full():
    from ttpeft.methods import build_peft_config, get_method
    from peft import get_peft_model

    from tiny_models import tiny_bert

    model = tiny_bert()
    config = build_peft_config(get_method("loretta_adp"), {"target_modules": r".*layer\.\d+\.output\.dense",
                                                            "train_layernorms": False},
                               "SEQ_CLS", model)
    adapted = get_peft_model(model, config).targeted_module_names
    assert adapted and all(".attention." not in name and name.endswith(".output.dense") for name in adapted)


def test_unknown_option_from_the_console_is_one_line(tmp_path):
    result = _run_cli("train", "--epochz", "3", cwd=tmp_path)
    assert result.returncode == 2
    assert "unrecognized arguments: --epochz" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def _metric(run_dir):
    return json.loads((run_dir / "results.json").read_text())["metrics"]["accuracy"]


@pytest.mark.real_model
def test_main_job_small_train_then_eval_reproduces(tmp_path, capsys):
    """The README's main command on the real MiniLM and embedded SST-2, with small caps for CI."""
    small = ["--max-train-samples", "64", "--max-eval-samples", "64", "--batch-size", "16", "--no-progress"]
    run = tmp_path / "run"
    assert main(["train", *small, "--output-dir", str(run)]) == 0
    summary = capsys.readouterr().out
    assert "trainable parameters" in summary and "accuracy" in summary and str(run) in summary
    saved = json.loads((run / "results.json").read_text())
    assert saved["task"] == "glue/sst2" and saved["method"] == "ttlora" and saved["data"] == "embedded"
    assert saved["num_eval_examples"] == 64 and saved["num_train_examples"] == 64
    assert 0 < saved["trainable_params"] < saved["total_params"] / 100
    assert saved["head_params"] == 384 * 2 + 2  # MiniLM's classifier, 2 labels; the rest is the adapter
    assert saved["adapter_bytes"] == (run / "adapter_model.safetensors").stat().st_size
    assert saved["command"].startswith("ttpeft train --max-train-samples 64")
    for key in ("wall_time_s", "memory", "versions", "seed", "method_config"):
        assert saved[key]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no staging or scratch folders left

    assert main(["eval", str(run), "--no-progress"]) == 0
    assert "reproduced" in capsys.readouterr().out

    # same seed and settings: the same adapter and metric; a different run into the same folder is refused
    again = tmp_path / "again"
    assert main(["train", *small, "--output-dir", str(again)]) == 0
    assert _metric(again) == _metric(run)
    assert (again / "adapter_model.safetensors").read_bytes() == (run / "adapter_model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["train", *small, "--seed", "7", "--output-dir", str(run)]) == 2
    assert "holds a different run" in capsys.readouterr().err
    assert _metric(run) == saved["metrics"]["accuracy"]


@pytest.mark.real_model
@pytest.mark.slow
def test_causal_lm_prompt_scoring_on_smollm2(tmp_path, capsys):
    """SmolLM2 (GGUF) answers SST-2 by label-word likelihood; a TT-LoRA run on it saves and reloads."""
    run = tmp_path / "smol"
    args = ["train", "--model", "smollm2", "--max-train-samples", "8", "--max-eval-samples", "8",
            "--batch-size", "4", "--epochs", "1", "--max-length", "64", "--no-progress", "--output-dir", str(run)]
    assert main(args) == 0
    saved = json.loads((run / "results.json").read_text())
    assert saved["family"] == "causal_lm" and saved["train"]["steps"] == 2
    assert set(saved["method_config"]["target_modules"]) == {"q_proj", "v_proj"}
    assert "classifier" not in json.dumps(saved["method_config"]["modules_to_save"])  # no head: label words
    capsys.readouterr()
    assert main(["eval", str(run), "--no-progress"]) == 0
    assert "reproduced" in capsys.readouterr().out
