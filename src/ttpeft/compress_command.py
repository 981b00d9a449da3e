"""``ttpeft compress`` and ``ttpeft plan``: argument parsing and the two commands.

``add_compress_parser(commands)`` / ``add_plan_parser(commands)`` add the subcommands to the
``ttpeft`` parser (see ``ttpeft.cli``); ``run_compress(args)`` / ``run_plan(args)`` run them.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from .errors import InputError


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _rank(text: str):
    values = [int(v) for v in str(text).split(",")]
    return values[0] if len(values) == 1 else values


def add_compress_parser(commands) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "compress", help="turn a saved LoRA adapter into a TT-LoRA adapter",
        description="Compress each layer of a peft LoRA adapter by TT-SVD into a TT-LoRA adapter that "
                    "PeftModel.from_pretrained loads (after `import ttpeft`).")
    parser.add_argument("adapter", help="peft LoRA adapter folder (or a ttpeft train run folder)")
    parser.add_argument("--output-dir", required=True, help="where to write the TT-LoRA adapter")
    how = parser.add_argument_group("how much to compress (give one; none: exact)")
    how.add_argument("--tt-rank", type=_rank, default=None, help="rank cap, or one cap per bond (5,6,5)")
    how.add_argument("--rel-error", type=float, default=None, help="relative Frobenius error per layer")
    how.add_argument("--param-budget", type=_positive_int, default=None, help="total TT parameters")
    parser.add_argument("--tt-shape", default=None, help="one TT shape 'in factors|out factors' for every layer "
                                                         "(default: balanced factors per layer)")
    parser.add_argument("--factors-per-side", type=_positive_int, default=None,
                        help="factors of in/out features (default: with --param-budget the count with the lowest "
                             "error, with --rel-error the one with the fewest parameters, otherwise 3)")
    parser.add_argument("--alpha", type=float, default=8.0, help="TT-LoRA alpha of the new adapter")
    tune = parser.add_argument_group("optional short fine-tune of the compressed adapter (the train path)")
    tune.add_argument("--finetune-steps", type=_positive_int, default=None, help="training steps")
    tune.add_argument("--task", default=None, help="task to fine-tune and evaluate on")
    tune.add_argument("--model", default=None, help="base model (default: the adapter's run or base model)")
    tune.add_argument("--data-dir", default=None, help="folder of <benchmark>/<task>/<split>.parquet")
    tune.add_argument("--lr", type=float, default=5e-3, help="learning rate")
    tune.add_argument("--batch-size", type=_positive_int, default=32, help="examples per step")
    tune.add_argument("--max-length", type=_positive_int, default=128, help="tokens per example")
    tune.add_argument("--max-train-samples", type=_positive_int, default=None, help="train on a random subset")
    tune.add_argument("--max-eval-samples", type=_positive_int, default=None, help="evaluate on the first N")
    tune.add_argument("--seed", type=int, default=42, help="random seed")
    return parser


def add_plan_parser(commands) -> argparse.ArgumentParser:
    from .budget import CONFIG_CLASSES

    parser = commands.add_parser(
        "plan", help="print the per-layer shapes and ranks a parameter budget gives (no weights loaded)",
        description="Plan shapes and ranks for every target layer so that the adapter fits --param-budget; the "
                    "model is built from its config on the meta device.")
    parser.add_argument("--model", required=True,
                        help=f"a model folder, alias (minilm, smollm2) or preset ({', '.join(MODEL_PRESETS)})")
    parser.add_argument("--method", default="ttlora", help=f"method: {', '.join(CONFIG_CLASSES)}")
    parser.add_argument("--param-budget", type=_positive_int, required=True, help="total adapter parameters")
    parser.add_argument("--target-modules", default=None, help="comma-separated module names, or all-linear")
    parser.add_argument("--method-config", default=None, help="JSON file of further config fields")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser


# Configs of models too large to ship, for planning only (the published LLaMA-2-7B configuration).
MODEL_PRESETS = {
    "llama-2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
}


def meta_model(name: str):
    """The model built from its config on the meta device (no weights read or allocated)."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    if name in MODEL_PRESETS:
        fields = dict(MODEL_PRESETS[name])
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    else:
        from .training import resolve_model

        source = resolve_model(name)
        config = AutoConfig.from_pretrained(source.path, **source.kwargs())
    causal = any("CausalLM" in a for a in (getattr(config, "architectures", None) or [])) or name in MODEL_PRESETS
    with torch.device("meta"):
        return (AutoModelForCausalLM if causal else AutoModel).from_config(config)


def run_plan(args) -> dict:
    from .budget import plan_model
    from .methods import parse_module_names

    fields = json.loads(Path(args.method_config).read_text()) if args.method_config else {}
    if args.target_modules:
        fields["target_modules"] = parse_module_names(args.target_modules)  # as `train` reads them
    model = meta_model(args.model)
    try:
        plan = plan_model(model, args.method, args.param_budget, **fields)
    except ValueError as error:
        raise InputError(str(error)) from None
    if args.json:
        print(json.dumps({"method": plan.method, "budget": plan.budget, "total": plan.total, "minimum": plan.minimum,
                          "extra_params": plan.extra_params, "layer_plan": plan.layer_plan()}, indent=2))
    else:
        print(plan.table())
    return {"total": plan.total, "layers": len(plan.layers)}


def run_compress(args) -> dict:
    from .compress import compress_lora

    adapter = Path(args.adapter)
    tt_shape = None
    if args.tt_shape:
        tt_shape = [[int(v) for v in side.split(",")] for side in args.tt_shape.split("|")]
    try:
        result = compress_lora(adapter, args.output_dir, tt_rank=args.tt_rank, rel_error=args.rel_error,
                               param_budget=args.param_budget, tt_shape=tt_shape,
                               factors_per_side=args.factors_per_side, alpha=args.alpha)
    except (ValueError, FileNotFoundError) as error:
        raise InputError(str(error)) from None
    print(result.summary())
    print(f"wrote {args.output_dir}")
    summary = {"report": result.report}
    if args.finetune_steps:
        if not args.task:
            raise InputError("--finetune-steps needs --task")
        summary["finetune"] = finetune_adapter(
            Path(args.output_dir), args.task, args.finetune_steps, model_name=args.model or _source_model(adapter),
            data_dir=args.data_dir, lr=args.lr, batch_size=args.batch_size, max_length=args.max_length,
            max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples, seed=args.seed)
    return summary


def _source_model(adapter: Path) -> str:
    """The base model a LoRA adapter was trained on: its ttpeft run's model, else adapter_config.json's."""
    results = adapter / "results.json"
    if results.is_file():
        return json.loads(results.read_text())["model"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    if not config.get("base_model_name_or_path"):
        raise InputError("the adapter does not name its base model; pass --model")
    return config["base_model_name_or_path"]


def finetune_adapter(adapter_dir: Path, task_name: str, steps: int, model_name: str, data_dir=None, lr=5e-3,
                     batch_size=32, max_length=128, max_train_samples=None, max_eval_samples=None, seed=42,
                     progress=False) -> dict:
    """Evaluate a saved TT-LoRA adapter, train it ``steps`` steps with the train path, evaluate again and
    save the trained adapter over the folder's (the compressed one stays in ``compressed/``)."""
    import shutil

    from peft import PeftModel
    from transformers import set_seed

    from . import training
    from .tasks import get_task, load_task_data

    task = get_task(task_name)
    data = load_task_data(task, data_dir, need_train=True)
    train_set = training.take(data.train, max_train_samples, seed=seed)
    validation = training.take(data.validation, max_eval_samples)
    source = training.resolve_model(model_name)
    family = training.model_family(source)
    set_seed(seed)
    model, tokenizer = training.load_model(source, task, family)
    model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
    before = training.evaluate(model, tokenizer, task, validation, family, max_length, batch_size, progress=progress)
    steps_per_epoch = math.ceil(len(train_set) / batch_size)
    # A fractional epoch count the Trainer turns into exactly ``steps`` steps.
    epochs = (steps - 0.5) / steps_per_epoch
    settings = training.TrainSettings(epochs=epochs, lr=lr, batch_size=batch_size, max_length=max_length, seed=seed,
                                      progress=progress)
    import tempfile

    with tempfile.TemporaryDirectory() as work_dir:
        summary = training.train(model, tokenizer, task, train_set, family, settings, work_dir)
    after = training.evaluate(model, tokenizer, task, validation, family, max_length, batch_size, progress=progress)
    compressed_copy = adapter_dir / "compressed"
    compressed_copy.mkdir(exist_ok=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy2(adapter_dir / name, compressed_copy / name)
    model.save_pretrained(str(adapter_dir))
    result = {"task": task.qualified_name, "steps": summary["steps"], "lr": lr, "batch_size": batch_size,
              "train_examples": len(train_set), "eval_examples": len(validation),
              "metrics_before": before, "metrics_after": after, "train": summary}
    (adapter_dir / "finetune.json").write_text(json.dumps(training.json_safe(result), indent=2) + "\n")
    headline = task.metrics[0]
    print(f"fine-tuned {summary['steps']} steps on {task.qualified_name}: {headline} "
          f"{before.get(headline, float('nan')):.4f} -> {after.get(headline, float('nan')):.4f}")
    return result
