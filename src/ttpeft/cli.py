"""The ``ttpeft`` command line: ``train`` a method on a task, ``eval`` a saved run."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional

from .errors import InputError

PROG = "ttpeft"
DEFAULT_TASK = "sst2"
DEFAULT_METHOD = "ttlora"
log = logging.getLogger("ttpeft")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a mistake on one line instead of the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: …)" to every option whose help does not already state it."""

    def _get_help_string(self, action):
        if action.help and "(default:" in action.help:
            return action.help
        return super()._get_help_string(action)


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def _method_option_help(option) -> str:
    from .methods import METHODS, field_default

    defaults = []
    for method_name, field_name in option.fields.items():
        default = field_default(METHODS[method_name], field_name)
        if field_name == "target_modules":
            return f"{option.help} (default: the method's targets for the architecture, e.g. query,value)"
        defaults.append(f"{method_name} {'-' if default is None else default}")
    return f"{option.help} (default: {', '.join(defaults)})"


def build_parser() -> argparse.ArgumentParser:
    from .compress_command import add_compress_parser, add_plan_parser
    from .methods import METHOD_OPTIONS, METHODS
    from .tasks import METRICS, task_names
    from .training import DEFAULT_MODEL, MODEL_ALIASES, PRECISIONS

    parser = _Parser(prog=PROG, description="Tensor-train parameter-efficient fine-tuning of Hugging Face models.")
    commands = parser.add_subparsers(dest="command", metavar="{train,eval,compress,plan}", parser_class=_Parser)
    commands.required = True
    formatter = _HelpFormatter

    train = commands.add_parser("train", help="fine-tune a model on a task and save the adapter",
                                formatter_class=formatter,
                                description="Fine-tune a model on a task; save the adapter and results.json.")
    what = train.add_argument_group("what to train")
    what.add_argument("--model", default=DEFAULT_MODEL,
                      help=f"model: {' or '.join(MODEL_ALIASES)} (shipped PyPI packages), a local folder, a .gguf "
                           "file, or a hub id")
    what.add_argument("--task", default=DEFAULT_TASK, help=f"task: {', '.join(task_names())}")
    what.add_argument("--method", default=DEFAULT_METHOD, help=f"method: {', '.join(METHODS)}")
    what.add_argument("--method-config", default=None, metavar="FILE",
                      help="JSON/YAML mapping of the method's config fields; options below override it")

    method_options = train.add_argument_group("method options (each applies to the methods listed)")
    for option in METHOD_OPTIONS:
        method_options.add_argument(option.flag, dest=option.dest, type=option.parse, default=None,
                                    help=_method_option_help(option).replace("%", "%%"))

    hyper = train.add_argument_group("training")
    hyper.add_argument("--epochs", type=_positive(float), default=2.0, help="training epochs")
    hyper.add_argument("--lr", type=_positive(float), default=None,
                       help="learning rate (default: the method's own: "
                            + ", ".join(f"{m.name} {m.default_lr:g}" for m in METHODS.values()) + ")")
    hyper.add_argument("--head-lr", type=_positive(float), default=None,
                       help="learning rate of the classification head (default: --lr)")
    hyper.add_argument("--layer-norm-lr", type=_positive(float), default=None,
                       help="learning rate of the trained layer norms (loretta_rep / loretta_adp with "
                            "--train-layernorms true, full; default: --lr)")
    hyper.add_argument("--batch-size", type=_positive(int), default=32,
                       help="examples per step and process (under torchrun / accelerate launch, times the "
                            "number of processes)")
    hyper.add_argument("--max-length", type=_positive(int), default=128, help="tokens per example (truncated)")
    hyper.add_argument("--seed", type=int, default=42, help="random seed (initialisation, data order, dropout)")
    hyper.add_argument("--warmup-fraction", type=float, default=0.06, help="fraction of steps for lr warm-up")
    hyper.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    hyper.add_argument("--precision", choices=PRECISIONS, default="fp32",
                       help="compute precision: bf16/fp16 autocast with fp32 trainable weights; fp16 needs CUDA")

    data = train.add_argument_group("data")
    _add_data_options(data)
    data.add_argument("--max-train-samples", type=_positive(int), default=None,
                      help="train on a random subset of this size")
    data.add_argument("--train-file", default=None, help="your own training data (CSV, JSON lines or Parquet)")
    data.add_argument("--validation-file", default=None, help="your own validation data (same formats)")
    data.add_argument("--text-fields", default=None,
                      help="with your own files: one or two comma-separated text columns")
    data.add_argument("--label-field", default="label", help="with your own files: the label column")
    data.add_argument("--label-names", default=None,
                      help="with your own files: comma-separated class labels in order (default: sorted values)")
    data.add_argument("--metric", default=None,
                      help=f"with your own files: {', '.join(METRICS)} (pearson/spearman/mse mean regression; "
                           "default accuracy)")

    out = train.add_argument_group("output")
    out.add_argument("--output-dir", default=None, help="run folder (default: runs/<task>-<method>-<time>)")
    out.add_argument("--overwrite", action="store_true", help="replace an output folder holding a different run")
    out.add_argument("--no-progress", action="store_true", help="no progress bars")

    evaluate = commands.add_parser("eval", help="evaluate a saved run on its task's validation split",
                                   formatter_class=formatter,
                                   description="Load a run's adapter onto its base model and recompute the metric.")
    evaluate.add_argument("run_dir", nargs="?", default=None,
                          help="folder written by ttpeft train; without it, a causal LM's zero-shot prompt "
                               "accuracy on --task")
    evaluate.add_argument("--model", default=None,
                          help="base model (default: the one the run was trained on; required without a run)")
    evaluate.add_argument("--task", default=DEFAULT_TASK, help="task for zero-shot evaluation (without a run)")
    evaluate.add_argument("--max-length", type=_positive(int), default=None,
                          help="tokens per example (default: the run's, else 128)")
    _add_data_options(evaluate)
    evaluate.add_argument("--batch-size", type=_positive(int), default=None,
                          help="evaluation batch size (default: the run's)")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_compress_parser(commands)
    add_plan_parser(commands)
    return parser


def _add_data_options(group) -> None:
    from .tasks import DATA_DIR_ENV

    group.add_argument("--data-dir", default=None,
                       help=f"folder of <benchmark>/<task>/<split>.parquet, 'hub' or 'embedded' (default: "
                            f"${DATA_DIR_ENV} if set, else the embedded SST-2 for sst2, else the hub)")
    group.add_argument("--max-eval-samples", type=_positive(int), default=None,
                       help="evaluate on the first N validation examples")


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        if args.command == "train":
            run_train(args, argv)
        elif args.command == "eval":
            run_eval(args)
        else:
            from .compress_command import run_compress, run_plan

            (run_compress if args.command == "compress" else run_plan)(args)
    except InputError as error:
        print(f"{PROG} {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


def _quiet_libraries() -> None:
    """Library chatter (load reports, hub warnings) would bury the progress and the summary."""
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        import datasets

        datasets.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    except ImportError:
        pass


# ------------------------------------------------------------------------------------------ commands


def _load_data(args, task_args: dict, need_train: bool):
    from .tasks import get_task, load_task_data, user_task

    if task_args.get("validation_file") or task_args.get("train_file"):
        if need_train and not task_args.get("train_file"):
            raise InputError("--train-file is required with --validation-file")
        return user_task(task_args.get("train_file"), task_args.get("validation_file"),
                         task_args.get("text_fields"), task_args.get("label_field") or "label",
                         task_args.get("metric"), task_args.get("label_names"))
    try:
        task = get_task(task_args["task"])
    except ValueError as error:
        raise InputError(str(error)) from None
    return load_task_data(task, args.data_dir, need_train=need_train)


def _absolute(path: Optional[str]) -> Optional[str]:
    """Files are stored by absolute path so that ``ttpeft eval`` finds them from any folder."""
    return str(Path(path).expanduser().resolve()) if path else None


def _split_list(text: Optional[str]) -> Optional[list[str]]:
    """The items of a comma-separated option; None when it was not given."""
    from .methods import comma_separated

    return comma_separated(text) if text else None


def run_train(args, argv: list[str]) -> dict:
    """Under torchrun / accelerate launch every process runs this; the main one alone writes and prints."""
    from . import training

    started = time.time()
    training.check_precision(args.precision)
    training.check_launch()
    main_process = training.process_state().is_main_process
    if not main_process:
        log.setLevel(logging.WARNING)
    try:
        results = _train_and_write(args, argv, started, main_process)
    except BaseException:
        training.end_processes(wait=False)
        raise
    training.end_processes()
    return results


def _train_and_write(args, argv: list[str], started: float, main_process: bool) -> dict:
    from . import training
    from .methods import get_method, method_config_fields, read_config_file

    method = get_method(args.method)
    file_fields = read_config_file(args.method_config) if args.method_config else None
    config_fields = method_config_fields(method, vars(args), file_fields)
    lr = args.lr or method.default_lr
    task_args = {"task": args.task, "train_file": _absolute(args.train_file),
                 "validation_file": _absolute(args.validation_file),
                 "text_fields": _split_list(args.text_fields), "label_field": args.label_field,
                 "metric": args.metric, "label_names": _split_list(args.label_names)}
    source = training.resolve_model(args.model)
    family = training.model_family(source)

    log.info("loading data")
    with training.process_state().main_process_first():  # one process downloads or caches, the others read
        data = _load_data(args, task_args, need_train=True)
    task = data.task
    settings = training.TrainSettings(epochs=args.epochs, lr=lr, batch_size=args.batch_size,
                                      max_length=args.max_length, seed=args.seed,
                                      warmup_fraction=args.warmup_fraction, weight_decay=args.weight_decay,
                                      progress=not args.no_progress and main_process, precision=args.precision,
                                      head_lr=args.head_lr, layer_norm_lr=args.layer_norm_lr)
    identity = {"task": task.qualified_name, "task_args": task_args, "data": data.source, "model": source.name,
                "method": method.name, "method_fields": config_fields,
                "settings": {k: v for k, v in vars(settings).items() if k != "progress"},
                "max_train_samples": args.max_train_samples, "max_eval_samples": args.max_eval_samples}
    processes = training.process_state().num_processes
    if processes > 1:  # the global batch, hence the run, depends on it
        identity["processes"] = processes
    output_dir = training.on_main_process(_checked_output_dir, args, task, method, identity)

    train_set = training.take(data.train, args.max_train_samples, seed=args.seed)
    validation = training.take(data.validation, args.max_eval_samples)
    log.info("task %s (%s): %d training, %d validation examples", task.qualified_name, data.source,
             len(train_set), len(validation))

    from transformers import set_seed

    set_seed(args.seed)
    log.info("loading model %s (%s)", source.name, family)
    model, tokenizer = training.load_model(source, task, family)
    model, method_config = training.apply_method(model, method, config_fields, family)
    trainable, total = training.count_parameters(model)
    log.info("%s: %s trainable of %s parameters", method.name, f"{trainable:,}", f"{total:,}")

    with _temporary_folder(output_dir) as work_dir:
        train_summary, trainer = training.fit(model, tokenizer, task, train_set, family, settings, work_dir)
    log.info("evaluating on %d validation examples", len(validation))
    # every process evaluates the same examples (under FSDP each forward gathers weights from all of them)
    metrics = training.evaluate(training.trained_model(trainer), tokenizer, task, validation, family,
                                settings.max_length, settings.batch_size, progress=settings.progress)
    state_dict = training.gathered_state_dict(trainer)
    results = {
        "task": task.qualified_name, "task_spec": _task_record(task, task_args), "data": data.source,
        "model": source.name, "model_path": source.path, "model_gguf_file": source.gguf_file, "family": family,
        "method": method.name, "method_config": method_config,
        "trainable_params": trainable, "total_params": total,
        "head_params": training.count_head_parameters(model),  # of the trainable ones
        "metrics": metrics, "headline_metric": task.metrics[0],
        "num_train_examples": len(train_set), "num_eval_examples": len(validation),
        "train": train_summary, "settings": identity["settings"],
        "seed": args.seed, "precision": settings.precision, "wall_time_s": round(time.time() - started, 1),
        "memory": training.peak_memory_mb(),
        "versions": training.package_versions(), "command": " ".join([PROG] + [_quote(a) for a in argv]),
        "identity": identity,
    }
    if main_process:
        results = training.write_run(output_dir, model, method, results, state_dict)
        print(_summary(results, output_dir))
    return results


def _checked_output_dir(args, task, method, identity: dict) -> Path:
    from .training import check_output_dir

    output_dir = Path(args.output_dir or f"runs/{task.name}-{method.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    check_output_dir(output_dir, identity, args.overwrite)
    return output_dir


def run_zero_shot(args) -> dict:
    """A causal LM's accuracy with the task's prompt and label words and no training: the baseline."""
    from . import training

    if not args.model:
        raise InputError("give a run folder, or --model (a causal LM) for a zero-shot evaluation")
    started = time.time()
    source = training.resolve_model(args.model)
    family = training.model_family(source)
    if family != training.CAUSAL_LM:
        raise InputError(f"{source.name} is an encoder: its classification head is untrained until ttpeft train, "
                         "so zero-shot evaluation needs a causal LM")
    data = _load_data(args, {"task": args.task}, need_train=False)
    validation = training.take(data.validation, args.max_eval_samples)
    model, tokenizer = training.load_model(source, data.task, family)
    metrics = training.evaluate(model, tokenizer, data.task, validation, family, args.max_length or 128,
                                args.batch_size or 32, progress=not args.no_progress)
    lines = [f"ttpeft eval: {data.task.qualified_name} ({data.source}) · zero-shot prompt on {source.name} · "
             f"{len(validation)} examples"]
    lines += [f"  {name:<10} {value:.4f}" for name, value in metrics.items()]
    lines.append(f"  wall time  {time.time() - started:.1f} s")
    print("\n".join(lines))
    return {"metrics": metrics}


def run_eval(args) -> dict:
    from . import training
    from .methods import get_method

    if args.run_dir is None:
        return run_zero_shot(args)
    run_dir = Path(args.run_dir)
    results_file = run_dir / training.RESULTS_FILE
    if not results_file.is_file():
        raise InputError(f"{run_dir} is not a ttpeft run folder (no {training.RESULTS_FILE})")
    try:
        saved = json.loads(results_file.read_text())
        task_args, settings = saved["identity"]["task_args"], saved["settings"]
        method = get_method(saved["method"])
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise InputError(f"{results_file} is not a valid ttpeft results file ({error})") from None
    started = time.time()
    if args.data_dir is None and not task_args.get("validation_file"):
        args.data_dir = _saved_data_dir(saved["data"])
    data = _load_data(args, task_args, need_train=False)
    task = data.task
    limit = args.max_eval_samples or saved["identity"].get("max_eval_samples")
    validation = training.take(data.validation, limit)
    source = training.resolve_model(args.model or saved["model"])
    family = training.model_family(source)
    log.info("loading model %s with the run's %s weights", source.name, method.name)
    model, tokenizer = training.load_model(source, task, family)
    model = training.load_weights(model, method, run_dir)
    max_length = args.max_length or settings["max_length"]
    metrics = training.evaluate(model, tokenizer, task, validation, family, max_length,
                                args.batch_size or settings["batch_size"], progress=not args.no_progress)
    headline = task.metrics[0]
    stored = saved.get("metrics", {}).get(headline)
    lines = [f"ttpeft eval: {task.qualified_name} · {method.name} on {source.name} · {len(validation)} examples"]
    lines += [f"  {name:<10} {value:.4f}" for name, value in metrics.items()]
    if stored is not None:
        same = abs(stored - metrics[headline]) < 1e-6 and len(validation) == saved.get("num_eval_examples")
        lines.append(f"  saved run  {headline} {stored:.4f} -> {'reproduced' if same else 'differs'}")
    lines.append(f"  wall time  {time.time() - started:.1f} s")
    print("\n".join(lines))
    return {"metrics": metrics, "saved_metrics": saved.get("metrics")}


def _saved_data_dir(data_source: str) -> Optional[str]:
    """The data source a run used, when it still exists (else the usual default order applies)."""
    if data_source in ("embedded",):
        return data_source
    if data_source.startswith("hub:"):
        return "hub"
    return data_source if Path(data_source).is_dir() else None


def _task_record(task, task_args: dict) -> dict:
    return {"name": task.qualified_name, "metrics": list(task.metrics),
            "label_names": list(task.label_names) if task.label_names else None,
            "regression": task.is_regression, **({"files": task_args} if task.benchmark == "user" else {})}


class _temporary_folder:
    """A scratch folder for the Trainer next to the output, removed afterwards; made and removed by the main
    process, shared by the others."""

    def __init__(self, output_dir: Path):
        self.parent = output_dir.resolve().parent

    def _make(self) -> str:
        import tempfile

        self.parent.mkdir(parents=True, exist_ok=True)
        return tempfile.mkdtemp(prefix=".ttpeft-trainer-", dir=self.parent)

    def __enter__(self) -> str:
        from .training import on_main_process

        self.path = on_main_process(self._make)
        return self.path

    def __exit__(self, *exc):
        import shutil

        from .training import process_state

        if process_state().is_main_process:
            shutil.rmtree(self.path, ignore_errors=True)


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _summary(results: dict, output_dir: Path) -> str:
    trainable, total = results["trainable_params"], results["total_params"]
    metrics = "  ".join(f"{k} {v:.4f}" for k, v in results["metrics"].items())
    minutes, seconds = divmod(results["wall_time_s"], 60)
    train = results["train"]
    processes = f", {train['processes']} processes" if train.get("processes", 1) > 1 else ""
    precision = f", {train['precision']}" if train.get("precision", "fp32") != "fp32" else ""
    return "\n".join([
        "",
        f"ttpeft train: {results['task']} ({results['data']}) · {results['method']} on {results['model']}",
        f"  trainable parameters  {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)",
        f"  training              {train['examples']} examples, {train['steps']} steps, "
        f"loss {train['train_loss']:.4f}, {train['train_runtime_s']:.0f} s{processes}{precision}",
        f"  validation            {metrics}  ({results['num_eval_examples']} examples)",
        f"  adapter               {output_dir}/ ({', '.join(results['adapter_files'])}, "
        f"{_human_bytes(results['adapter_bytes'])})",
        f"  results               {output_dir / 'results.json'}",
        f"  wall time             {int(minutes)} min {seconds:.0f} s, "
        f"peak memory {results['memory']['peak_rss_mb']:.0f} MB",
        f"  evaluate again        ttpeft eval {_quote(str(output_dir))}",
    ])
