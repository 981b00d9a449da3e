"""Fine-tuning and evaluating a model on a task with one method, with the Hugging Face Trainer.

Shared by the CLI and the benchmarks: load a model for a task (an encoder with a classification head,
or a causal LM that scores label words), wrap it with a method, train, evaluate, save a run folder.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import resource
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from . import models
from .errors import InputError
from .methods import Method, build_peft_config
from .tasks import TaskSpec, compute_metrics
from .tasks.prompts import answer_log_likelihoods, check_prompt_task, lm_training_features

log = logging.getLogger(__name__)

ENCODER, CAUSAL_LM = "encoder", "causal_lm"
DEFAULT_MODEL = "minilm"
RESULTS_FILE = "results.json"
WEIGHTS_FILE = "trainable_weights.safetensors"  # full / head runs; peft runs save peft's adapter files
HEAD_MODULES = ("classifier", "score")  # names of classification heads in transformers models


def _minilm_path() -> Path:
    return Path(models.minilm_path())


def _smollm2_path() -> Path:
    return Path(models.smollm2_dir()) / models.SMOLLM2_GGUF_FILE


# Short names for the models shipped as PyPI packages.
MODEL_ALIASES = {"minilm": _minilm_path, "smollm2": _smollm2_path}


@dataclass
class ModelSource:
    name: str  # as the user gave it
    path: str  # local folder or hub id
    gguf_file: Optional[str] = None

    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve_model(name: Optional[str]) -> ModelSource:
    """A model alias, a local folder, a local .gguf file, or a hub id."""
    name = name or DEFAULT_MODEL
    if name in MODEL_ALIASES:
        try:
            path = MODEL_ALIASES[name]()
        except FileNotFoundError as error:
            raise InputError(f"model {name!r}: {error}") from None
        return resolve_model_path(name, path)
    path = Path(name).expanduser()
    if path.exists():
        return resolve_model_path(name, path)
    looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise InputError(f"model path {name} does not exist (give a local folder, a .gguf file, a hub id "
                         f"like org/name, or one of: {', '.join(MODEL_ALIASES)})")
    return ModelSource(name, name)


def resolve_model_path(name: str, path: Path) -> ModelSource:
    if path.is_file():
        if path.suffix != ".gguf":
            raise InputError(f"model file {path} is not a .gguf file; give a model folder or a .gguf file")
        return ModelSource(name, str(path.parent), path.name)
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(name, str(path), ggufs[0].name)
        raise InputError(f"model folder {path} has no config.json (nor a single .gguf file)")
    return ModelSource(name, str(path))


def model_family(source: ModelSource) -> str:
    from transformers import AutoConfig

    if source.gguf_file:  # GGUF files hold causal LMs; reading one just for its config costs seconds
        return CAUSAL_LM
    try:
        config = AutoConfig.from_pretrained(source.path, **source.kwargs())
    except Exception as error:
        raise InputError(f"cannot load model {source.name}: {_first_line(error)}") from None
    architectures = " ".join(getattr(config, "architectures", None) or [])
    causal = "CausalLM" in architectures or "LMHead" in architectures or getattr(config, "is_decoder", False)
    if not architectures:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        causal = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and config.model_type not in (
            "bert", "roberta", "deberta", "deberta-v2", "xlm-roberta", "electra")
    return CAUSAL_LM if causal else ENCODER


def load_model(source: ModelSource, task: TaskSpec, family: str):
    """(model, tokenizer) for the task: a classification/regression head on encoders, none on causal LMs."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, **source.kwargs())
        if family == CAUSAL_LM:
            check_prompt_task(task)
            model = AutoModelForCausalLM.from_pretrained(source.path, **source.kwargs(), **float32_weights())
            if source.gguf_file:
                _forget_gguf_quantization(model)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                source.path, num_labels=task.num_labels,
                problem_type="regression" if task.is_regression else "single_label_classification",
                **source.kwargs(), **float32_weights())
    except InputError:
        raise
    except Exception as error:
        raise InputError(f"cannot load model {source.name}: {_first_line(error)}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # positions of real tokens then do not depend on the batch's padding
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def float32_weights() -> dict:
    """from_pretrained's argument for float32 weights whatever the checkpoint stores. transformers 5 loads a
    half-precision checkpoint in its own dtype, which would train the head (and layer norms, or every weight
    with --method full) in fp16/bf16; --precision autocasts the compute instead."""
    import transformers
    from packaging.version import Version

    name = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {name: torch.float32}


def _forget_gguf_quantization(model) -> None:
    """transformers dequantizes GGUF weights to floats on load but keeps the model marked as quantized,
    which makes the Trainer refuse it; the weights are ordinary float tensors, so drop the mark."""
    model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        try:
            model.is_quantized = False
        except AttributeError:  # a read-only property derived from hf_quantizer
            pass


def apply_method(model, method: Method, config_fields: dict, family: str):
    """Wrap the model for ``method``; returns (model, config dict for results.json)."""
    if method.config_class is None:
        if method.name == "head":
            if family == CAUSAL_LM:
                raise InputError("method 'head' trains a classification head; causal LMs score label words "
                                 "and have none: choose another method")
            for name, param in model.named_parameters():
                param.requires_grad = name.split(".")[0] in HEAD_MODULES
        else:
            model.requires_grad_(True)
        return model, {}
    from peft import get_peft_model

    config = build_peft_config(method, config_fields, "CAUSAL_LM" if family == CAUSAL_LM else "SEQ_CLS", model)
    try:
        peft_model = get_peft_model(model, config)
    except (ValueError, TypeError, KeyError) as error:
        raise InputError(f"cannot apply {method.name} to this model: {_first_line(error)}") from None
    return peft_model, json_safe(config.to_dict())


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def count_head_parameters(model) -> int:
    """Trainable parameters of the classification head (part of ``count_parameters``' trainable count)."""
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and is_head_parameter(n))


# ---------------------------------------------------------------------------------------------- data


def featurize(task: TaskSpec, tokenizer, dataset, family: str, max_length: int):
    """Token ids (and labels) for training: class labels for encoders, LM labels on the answer for LMs."""
    if family == CAUSAL_LM:
        return dataset.map(lambda ex: lm_training_features(task, tokenizer, ex, max_length),
                           remove_columns=dataset.column_names)

    def encode(batch):
        texts = [[template.format(**example) for example in _rows(batch)] for template in task.encoder_texts]
        encoded = tokenizer(*texts, truncation=True, max_length=max_length)
        encoded["labels"] = batch["labels"]
        return encoded

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names)


def _rows(batch: dict):
    keys = list(batch)
    for values in zip(*(batch[k] for k in keys)):
        yield dict(zip(keys, values))


def take(dataset, limit: Optional[int], seed: Optional[int] = None):
    """At most ``limit`` rows: a seeded random subset for training, the first rows for evaluation."""
    if limit is None or limit >= len(dataset):
        return dataset
    if seed is not None:
        dataset = dataset.shuffle(seed=seed)
    return dataset.select(range(limit))


# ----------------------------------------------------------------------------------------- training


@dataclass
class TrainSettings:
    epochs: float = 3.0
    lr: float = 5e-3
    batch_size: int = 32
    max_length: int = 128
    seed: int = 42
    warmup_fraction: float = 0.06
    weight_decay: float = 0.0
    progress: bool = True
    logging_steps: Optional[int] = None
    precision: str = "fp32"  # autocast dtype; trainable weights stay fp32 either way
    head_lr: Optional[float] = None  # learning rate of the classification head; None: ``lr``
    layer_norm_lr: Optional[float] = None  # learning rate of trained layer norms (LoRETTA); None: ``lr``


def train(model, tokenizer, task: TaskSpec, train_set, family: str, settings: TrainSettings, work_dir: str) -> dict:
    """Train with the HF Trainer; returns a summary of the run (steps, final loss, runtime)."""
    return fit(model, tokenizer, task, train_set, family, settings, work_dir)[0]


def fit(model, tokenizer, task: TaskSpec, train_set, family: str, settings: TrainSettings, work_dir: str):
    """``train``, also returning the Trainer (its model, wrapped for DDP/FSDP when launched on several processes).

    ``settings.batch_size`` is per process: under torchrun / accelerate launch each step sees
    ``batch_size × processes`` examples, split across the processes by the Trainer's sampler."""
    from accelerate.utils import parse_flag_from_env
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding, Trainer, TrainingArguments

    check_precision(settings.precision)
    if settings.layer_norm_lr is not None and not layer_norm_parameter_ids(model):
        raise InputError(f"--layer-norm-lr {settings.layer_norm_lr:g}: this model trains no layer norms; they "
                         "train with loretta_rep / loretta_adp (--train-layernorms true) and full fine-tuning")
    state = process_state()
    with state.main_process_first():  # one process fills the datasets cache, the others read it
        features = featurize(task, tokenizer, train_set, family, settings.max_length)
    processes = state.num_processes
    steps_per_epoch = math.ceil(len(features) / (settings.batch_size * processes))
    total_steps = max(1, math.ceil(steps_per_epoch * settings.epochs))
    head_bias = start_regression_at_label_mean(model, features) if task.is_regression else None
    collator = (DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100) if family == CAUSAL_LM
                else DataCollatorWithPadding(tokenizer))
    args = TrainingArguments(
        output_dir=work_dir, num_train_epochs=settings.epochs, learning_rate=settings.lr,
        per_device_train_batch_size=settings.batch_size, warmup_steps=int(settings.warmup_fraction * total_steps),
        weight_decay=settings.weight_decay, lr_scheduler_type="linear", seed=settings.seed, data_seed=settings.seed,
        logging_steps=settings.logging_steps or max(1, total_steps // 10), save_strategy="no",
        report_to="none", disable_tqdm=not settings.progress, remove_unused_columns=False,
        dataloader_num_workers=0, use_cpu=_cpu_only(),
        bf16=settings.precision == "bf16", fp16=settings.precision == "fp16",
    )
    trainer_class = (_trainer_with_group_lrs(Trainer, settings.head_lr, settings.layer_norm_lr)
                     if settings.head_lr or settings.layer_norm_lr else Trainer)
    trainer = trainer_class(model=model, args=args, train_dataset=features, data_collator=collator)
    if family == ENCODER:
        # a classification loss is a mean over this process's examples and ignores num_items_in_batch; left
        # on, the Trainer would multiply it by the number of processes, scaling loss and gradients
        trainer.model_accepts_loss_kwargs = False
    if trainer.is_fsdp_enabled:
        prepare_for_sharding(model)
    elif parse_flag_from_env("ACCELERATE_USE_FSDP"):
        raise InputError(FSDP_NOT_ENABLED)
    output = trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    summary = {"steps": output.global_step, "train_loss": float(output.training_loss),
               "final_logged_loss": float(losses[-1]) if losses else None,
               "train_runtime_s": float(output.metrics.get("train_runtime", 0.0)), "examples": len(features),
               "processes": args.world_size, "global_batch_size": settings.batch_size * args.world_size,
               "precision": settings.precision, "distributed": _distributed_kind(trainer)}
    if head_bias is not None:
        summary["head_bias_init"] = head_bias
    summary["loss_fell"] = loss_fell(losses)
    if summary["loss_fell"] is False:
        log.warning("the training loss did not fall (%.4g over the first third of the logged steps, %.4g over the "
                    "last): the model has not learned the task. A lower --lr than %g, or more steps, may help.",
                    *third_means(losses), settings.lr)
    return summary, trainer


def third_means(losses: list[float]) -> tuple[float, float]:
    """Mean logged loss over the first and over the last third of the logged steps."""
    third = max(1, len(losses) // 3)
    return float(np.mean(losses[:third])), float(np.mean(losses[-third:]))


def loss_fell(losses: list[float]) -> Optional[bool]:
    """Whether the last third of the logged losses is at least 5% below the first (None: under 3 logged).

    A run that never leaves its starting loss (e.g. a regression stuck at the label mean after too large a
    learning rate) still reports metrics; this says so instead of leaving it to the user to notice."""
    if len(losses) < 3:
        return None
    first, last = third_means(losses)
    return last < 0.95 * first


def start_regression_at_label_mean(model, features) -> Optional[float]:
    """Set the regression head's trainable output bias to the mean training label; returns it (None: no bias).

    A fresh head predicts ~0 while e.g. STS-B scores average ~2.7: the first steps' large, coherent gradients
    then go into the adapter, distorting the features to shift the output (TT-LoRA's products of cores
    follow them fastest) rather than into the one bias that should carry it."""
    biases = [p for n, p in model.named_parameters()
              if p.requires_grad and is_head_parameter(n) and n.endswith("bias") and p.numel() == 1]
    if not biases:
        return None
    mean = float(np.mean(features["labels"]))
    with torch.no_grad():
        for bias in biases:
            bias.fill_(mean)
    return mean


def is_head_parameter(name: str) -> bool:
    """A parameter of the classification head (``classifier`` / ``score``, peft's trainable copy included)."""
    return any(part in HEAD_MODULES for part in name.split("."))


def layer_norm_parameter_ids(model) -> set[int]:
    """ids of the trainable parameters of normalisation layers (LayerNorm, RMSNorm, ...; peft's trained copies
    included)."""
    from .tuners.loretta_common import is_norm_module

    return {id(p) for module in model.modules() if is_norm_module(module)
            for p in module.parameters(recurse=False) if p.requires_grad}


def _trainer_with_group_lrs(trainer_class, head_lr: Optional[float], layer_norm_lr: Optional[float]):
    """The Trainer, its optimizer giving the head's parameters and the layer norms' their own learning rates
    (None: the common one; the scheduler then scales every rate alike)."""

    class GroupLrTrainer(trainer_class):
        def create_optimizer(self, model=None):
            optimizer = super().create_optimizer(model)
            model = model or self.model
            names = {id(p): n for n, p in model.named_parameters()}
            norms = layer_norm_parameter_ids(model)

            def rate(p):
                if head_lr is not None and is_head_parameter(names.get(id(p), "")):
                    return head_lr
                if layer_norm_lr is not None and id(p) in norms:
                    return layer_norm_lr
                return None

            groups = []
            for group in optimizer.param_groups:
                by_rate = {}
                for p in group["params"]:
                    by_rate.setdefault(rate(p), []).append(p)
                for lr, params in by_rate.items():
                    groups.append({**group, "params": params, **({"lr": lr} if lr is not None else {})})
            optimizer.param_groups = []
            for group in groups:
                optimizer.add_param_group(group)
            return optimizer

    return GroupLrTrainer


PRECISIONS = ("fp32", "bf16", "fp16")
FSDP_NOT_ENABLED = ("accelerate launch asked for FSDP (distributed_type: FSDP), but accelerate shards models only on "
                    "GPUs and would run these processes as plain DDP; launch DDP instead (torchrun, or accelerate "
                    "launch --config_file configs/accelerate/ddp.yaml)")


def check_launch() -> None:
    """Refuse early an FSDP launch on a machine without GPUs, which accelerate would quietly run as DDP."""
    from accelerate.utils import parse_flag_from_env

    if parse_flag_from_env("ACCELERATE_USE_FSDP") and _cpu_only():
        raise InputError(FSDP_NOT_ENABLED)


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise InputError(f"--precision {precision!r} is not valid: choose one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and not torch.cuda.is_available():
        # fp16 training needs a loss scaler, which the Trainer only runs on CUDA
        raise InputError("--precision fp16 needs a CUDA GPU (fp16 training scales the loss on CUDA); "
                         "on CPU use --precision bf16 or --precision fp32")


def _cpu_only() -> bool:
    """No accelerator: tell the Trainer so, which also makes torchrun on CPU train with gloo DDP instead of
    running independent copies."""
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    return not (accelerator.is_available() if accelerator is not None else torch.cuda.is_available())


def _distributed_kind(trainer) -> Optional[str]:
    if trainer.is_fsdp_enabled:
        return "fsdp"
    if trainer.args.world_size <= 1:
        return None
    return str(trainer.accelerator.distributed_type.value).lower()  # multi_cpu, multi_gpu, ...


def prepare_for_sharding(model) -> None:
    """Under FSDP a layer's weights (TT cores included) are whole only while that layer runs: TT layers then
    build their thin factors layer by layer rather than all together before the forward."""
    for module in model.modules():
        if hasattr(module, "group_factors"):
            module.group_factors = False


def trained_model(trainer):
    """The model to evaluate after ``fit``: under FSDP the module that gathers its sharded weights in forward
    (every process must then run the same forwards); otherwise the plain model, whole on every process."""
    return trainer.model_wrapped if trainer.is_fsdp_enabled else trainer.model


def gathered_state_dict(trainer) -> Optional[dict]:
    """Under FSDP, the full state dict gathered onto the main process (a collective: every process calls it);
    None when the model already holds its full weights."""
    if not trainer.is_fsdp_enabled:
        return None
    return trainer.accelerator.get_state_dict(trainer.model_wrapped)


# -------------------------------------------------------------------------------------- processes


def process_state():
    """accelerate's view of the processes: one, or those started by torchrun / accelerate launch (it joins
    their process group). Every process runs the same command; only the main one writes files."""
    from accelerate import PartialState

    return PartialState(cpu=_cpu_only())


def on_main_process(function, *args, **kwargs):
    """``function(*args)`` on the main process, its result (or its InputError) handed to every process, so
    that all of them go on, or all stop with the same message."""
    from accelerate.utils import broadcast_object_list

    state = process_state()
    outcome = [None, None]
    if state.is_main_process:
        try:
            outcome[0] = function(*args, **kwargs)
        except InputError as error:
            if state.num_processes == 1:
                raise
            outcome[1] = str(error)
    if state.num_processes > 1:
        broadcast_object_list(outcome, from_process=0)
    if outcome[1] is not None:
        raise InputError(outcome[1])
    return outcome[0]


def end_processes(wait: bool = True) -> None:
    """Wait for the main process (it writes the run), then leave the process group. After an error, leave
    without waiting: a process that failed alone would otherwise hold the others until the timeout."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    state = process_state()
    if state.num_processes > 1:
        if wait:
            state.wait_for_everyone()
        state.destroy_process_group()


@torch.no_grad()
def evaluate(model, tokenizer, task: TaskSpec, dataset, family: str, max_length: int, batch_size: int,
             progress: bool = True) -> dict:
    """The task's metrics on ``dataset`` (prompt scoring for causal LMs, the head's output for encoders)."""
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(dataset), desc="evaluating", unit="ex", disable=not progress, leave=False)
    if family == CAUSAL_LM:
        predictions = []
        for start in range(0, len(dataset), batch_size):
            rows = dataset.select(range(start, min(start + batch_size, len(dataset))))
            scores = answer_log_likelihoods(model, tokenizer, task, list(rows), max_length, batch_size * 2)
            predictions.extend(scores.argmax(dim=-1).tolist())
            bar.update(len(rows))
    else:
        predictions = _encoder_predictions(model, tokenizer, task, dataset, max_length, batch_size, bar)
    bar.close()
    model.train(was_training)
    groups = dataset[task.group_field] if task.group_field else None
    return compute_metrics(task.metrics, predictions, dataset["labels"], groups)


def _encoder_predictions(model, tokenizer, task, dataset, max_length, batch_size, bar) -> list:
    from transformers import DataCollatorWithPadding

    features = featurize(task, tokenizer, dataset, ENCODER, max_length).remove_columns("labels")
    collate = DataCollatorWithPadding(tokenizer)
    device = next(model.parameters()).device
    predictions = []
    for start in range(0, len(features), batch_size):
        batch = collate([features[i] for i in range(start, min(start + batch_size, len(features)))])
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
        predictions.extend(logits[:, 0].tolist() if task.is_regression else logits.argmax(dim=-1).tolist())
        bar.update(len(batch["input_ids"]))
    return predictions


# ------------------------------------------------------------------------------------------ saving


def save_weights(model, method: Method, folder: Path, state_dict: Optional[dict] = None) -> list[str]:
    """Save what training changed: peft's adapter files, or the trained weights for full / head.
    ``state_dict``: the model's full weights when the model itself holds shards (FSDP)."""
    if method.config_class is not None:
        model.save_pretrained(str(folder), state_dict=state_dict)
    else:
        from safetensors.torch import save_file

        values = state_dict if state_dict is not None else dict(model.named_parameters())
        trained = {name: values[name].detach().cpu().contiguous()
                   for name, p in model.named_parameters() if p.requires_grad}
        save_file(trained, str(folder / WEIGHTS_FILE))
    return sorted(p.name for p in folder.iterdir() if p.suffix == ".safetensors")


def load_weights(model, method: Method, folder: Path):
    """Put a saved run's weights onto a freshly loaded base model."""
    if method.config_class is not None:
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(folder))
    from safetensors.torch import load_file

    state = load_file(str(folder / WEIGHTS_FILE))
    missing = set(state) - {name for name, _ in model.named_parameters()}
    if missing:
        raise InputError(f"{folder / WEIGHTS_FILE} does not match the base model (e.g. {sorted(missing)[0]})")
    model.load_state_dict(state, strict=False)
    return model


def check_output_dir(output_dir: Path, run_identity: dict, overwrite: bool) -> None:
    """Refuse a folder that holds something else than this same run, unless ``overwrite``."""
    if overwrite or not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise InputError(f"output path {output_dir} exists and is not a folder")
    if not any(output_dir.iterdir()):
        return
    results = output_dir / RESULTS_FILE
    if results.is_file():
        try:
            previous = json.loads(results.read_text()).get("identity")
        except (OSError, json.JSONDecodeError):
            previous = None
        if previous == json_safe(run_identity):
            return
        raise InputError(f"output folder {output_dir} holds a different run; choose another --output-dir "
                         "or pass --overwrite")
    raise InputError(f"output folder {output_dir} is not empty; choose another --output-dir or pass --overwrite")


def write_run(output_dir: Path, model, method: Method, results: dict, state_dict: Optional[dict] = None) -> dict:
    """Write weights and results.json into a temporary sibling folder, then rename it into place, so an
    interrupted run never leaves a complete-looking folder. Call it on the main process only."""
    output_dir = output_dir.resolve()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    try:
        files = save_weights(model, method, staging, state_dict)
        results["adapter_files"] = files
        results["adapter_bytes"] = sum((staging / name).stat().st_size for name in files)
        (staging / RESULTS_FILE).write_text(json.dumps(json_safe(results), indent=2) + "\n")
        staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the run folder is an ordinary folder
        if output_dir.exists():
            old = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}")
            output_dir.rename(old)
            staging.rename(output_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(output_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return results


# ----------------------------------------------------------------------------------------- helpers


def peak_memory_mb() -> dict:
    memory = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        memory["peak_cuda_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return memory


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for name in ("ttpeft", "torch", "transformers", "peft", "datasets", "scikit-learn", "safetensors"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def json_safe(value):
    """Sets, tuples, enums and numpy scalars as plain JSON values."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        items = [json_safe(v) for v in value]
        return sorted(items, key=str) if isinstance(value, set) else items
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value.value if hasattr(value, "value") and isinstance(value, str) else value
    return str(value)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def command_line() -> str:
    import shlex

    return " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name] + sys.argv[1:])
