"""The fine-tuning methods the CLI knows: name -> peft config (or full / head-only training)."""

from __future__ import annotations

import dataclasses
import importlib
import json
from argparse import ArgumentTypeError  # argparse shows its message as written
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from .errors import InputError


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    config_class: Optional[tuple[str, str]]  # (module, class) imported on use; None for full / head
    default_lr: float
    dropout_field: Optional[str] = None


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("ttlora", "TT-LoRA: the weight update is one tensor train", ("ttpeft", "TTLoraConfig"), 5e-3, "dropout"),
    Method("loretta_rep", "LoRETTA_rep: LoRA whose two factors are tensor trains",
           ("ttpeft", "LorettaRepConfig"), 5e-3, "dropout"),
    Method("loretta_adp", "LoRETTA_adp: bottleneck adapters with tensor-train projections",
           ("ttpeft", "LorettaAdpConfig"), 5e-3, "dropout"),
    Method("lora", "LoRA (peft)", ("peft", "LoraConfig"), 2e-3, "lora_dropout"),
    Method("vera", "VeRA (peft)", ("peft", "VeraConfig"), 1e-2, "vera_dropout"),
    Method("fourierft", "FourierFT (peft)", ("peft", "FourierFTConfig"), 5e-2),
    Method("vblora", "VB-LoRA (peft)", ("peft", "VBLoRAConfig"), 5e-3, "vblora_dropout"),
    Method("tinylora", "TinyLoRA (peft)", ("peft", "TinyLoraConfig"), 1e-2, "tinylora_dropout"),
    # LoKr and IA3 at 1e-3 / 5e-3 barely move in a short run (MiniLM, 1,000 SST-2 rows, 3 epochs, held-out
    # rows: LoKr 52.0 at 1e-3, 79.5 at 4e-3, 80.0 at 1e-2; IA3 at 7k parameters 58.0 / 71.5 / 76.0 at
    # 2.5e-3 / 5e-3 / 1e-2), so their defaults sit where they train.
    Method("lokr", "LoKr (peft)", ("peft", "LoKrConfig"), 5e-3, "module_dropout"),
    Method("ia3", "IA3 (peft)", ("peft", "IA3Config"), 1e-2),
    Method("ln_tuning", "LN tuning: train only the layer norms (peft)", ("peft", "LNTuningConfig"), 5e-3),
    Method("full", "full fine-tuning of every weight", None, 5e-5),
    Method("head", "train only the classification head", None, 5e-3),
)}


def _int_list(text: str):
    """``5`` or ``5,6,5`` (one rank per bond)."""
    values = [int(v) for v in str(text).split(",")]
    return values[0] if len(values) == 1 else values


def _tt_shape(text: str):
    """``64,4,3|3,4,64`` or JSON ``[[64,4,3],[3,4,64]]``."""
    text = str(text).strip()
    if text.startswith("["):
        return json.loads(text)
    return [[int(v) for v in side.split(",")] for side in text.split("|")]


def _yes_no(text: str) -> bool:
    value = str(text).strip().lower()
    if value not in ("true", "false", "yes", "no", "1", "0"):
        raise ValueError(f"expected true or false, got {text!r}")
    return value in ("true", "yes", "1")


_REGEX_CHARACTERS = set("*+?\\[](){}^$|")


def parse_module_names(text: str):
    """'all-linear', a regex (any regex character: one pattern, matched in full as peft does) or a
    comma-separated list of module name suffixes."""
    if text == "all-linear" or _REGEX_CHARACTERS & set(text):
        return text
    return comma_separated(text)


def comma_separated(text: str) -> list[str]:
    """The non-empty, stripped items of a comma-separated list."""
    return [name.strip() for name in text.split(",") if name.strip()]


def parse_suffix_list(text: str) -> list[str]:
    """A comma-separated list of module name suffixes (peft's ``modules_to_save`` takes no regex)."""
    if _REGEX_CHARACTERS & set(text):
        raise ArgumentTypeError(f"expected comma-separated module name suffixes, got the pattern {text!r} "
                                "(modules_to_save matches name endings, not a regex)")
    names = comma_separated(text)
    if not names:
        raise ArgumentTypeError(f"expected at least one module name, got {text!r}")
    return names


@dataclass(frozen=True)
class MethodOption:
    """One CLI option and the config field it sets for each method that has it."""

    flag: str
    parse: Callable[[str], Any]
    help: str
    fields: dict[str, str]  # method name -> config field

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


_PEFT_METHODS = [name for name, m in METHODS.items() if m.config_class]
METHOD_OPTIONS: tuple[MethodOption, ...] = (
    MethodOption("--target-modules", parse_module_names, "comma-separated module names to adapt, all-linear, "
                 "or one regex matched against the full module name",
                 {name: "target_modules" for name in _PEFT_METHODS}),
    MethodOption("--modules-to-save", parse_suffix_list, "comma-separated modules trained in full and saved "
                 "with the adapter (peft's modules_to_save: name suffixes, e.g. layer norms)",
                 {name: "modules_to_save" for name in _PEFT_METHODS}),
    MethodOption("--tt-rank", _int_list, "TT rank, or one rank per bond (5,6,5)", {"ttlora": "tt_rank"}),
    MethodOption("--tt-shape", _tt_shape, "TT shape 'in factors|out factors', e.g. 8,8,6|6,8,8",
                 {"ttlora": "tt_shape"}),
    MethodOption("--factors-per-side", int, "factors each of in/out features is split into when the TT shape "
                 "is derived (fewer factors: fewer cores, which train faster at a small budget)",
                 {"ttlora": "factors_per_side"}),
    MethodOption("--alpha", float, "scale of the update", {"ttlora": "alpha", "lokr": "alpha"}),
    MethodOption("--r", int, "rank", {n: "r" for n in ("lora", "loretta_rep", "vera", "vblora", "tinylora", "lokr")}),
    MethodOption("--lora-alpha", float, "LoRA scale numerator (scale = lora_alpha / r)",
                 {"lora": "lora_alpha", "loretta_rep": "lora_alpha"}),
    MethodOption("--tensor-rank", int, "rank of the tensor trains", {"loretta_rep": "tensor_rank",
                                                                    "loretta_adp": "tensor_rank"}),
    MethodOption("--tensor-cores", int, "cores in each derived train of the two projections (default: the "
                 "published shape; fewer cores train faster at a small budget)",
                 {"loretta_rep": "tensor_cores", "loretta_adp": "tensor_cores"}),
    MethodOption("--param-budget", int, "total adapter parameters, planned per layer (shapes and ranks)",
                 {"ttlora": "param_budget", "loretta_rep": "param_budget", "loretta_adp": "param_budget"}),
    MethodOption("--bottleneck-size", int, "adapter bottleneck width", {"loretta_adp": "bottleneck_size"}),
    MethodOption("--scaling", float, "scale of the update", {"loretta_adp": "scaling", "fourierft": "scaling"}),
    MethodOption("--init", str, "adapter initialisation", {"ttlora": "init", "loretta_rep": "init",
                                                           "loretta_adp": "init"}),
    MethodOption("--non-linearity", str, "adapter activation", {"loretta_adp": "non_linearity"}),
    MethodOption("--input-adapter-modules", parse_module_names, "comma-separated targets whose adapter acts on "
                 "their input, before the layer (default: gate_proj,up_proj on LLaMA-family models, none otherwise)",
                 {"loretta_adp": "input_adapter_modules"}),
    MethodOption("--parallel-adapter-modules", parse_module_names, "comma-separated targets whose adapter runs "
                 "beside them, from their input to their output (default: none)",
                 {"loretta_adp": "parallel_adapter_modules"}),
    MethodOption("--adapter-bias", _yes_no, "train a bias on each adapter projection (true/false; default true, "
                 "as published)", {"loretta_adp": "adapter_bias"}),
    MethodOption("--normalize-input", _yes_no, "RMS-normalise the adapter's input (true/false)",
                 {"loretta_adp": "normalize_input"}),
    MethodOption("--weight-norm", _yes_no, "weight-normalised projections: up is a trained gain from 0 times a "
                 "unit-norm train, down keeps a fixed norm (true/false)", {"loretta_adp": "weight_norm"}),
    MethodOption("--train-layernorms", _yes_no, "also train the layer norms (true/false)",
                 {"loretta_rep": "train_layernorms", "loretta_adp": "train_layernorms"}),
    MethodOption("--layernorm-modules", parse_module_names, "with --train-layernorms true, train only these layer "
                 "norms: comma-separated name suffixes, or one regex matched against the full name",
                 {"loretta_rep": "layernorm_modules", "loretta_adp": "layernorm_modules"}),
    MethodOption("--tensorised-head", _yes_no, "replace the classifier's hidden dense layer by a TT layer",
                 {"loretta_rep": "tensorised_head", "loretta_adp": "tensorised_head"}),
    MethodOption("--dropout", float, "dropout in the adapter",
                 {name: m.dropout_field for name, m in METHODS.items() if m.dropout_field}),
    MethodOption("--n-frequency", int, "trained spectral coefficients per layer", {"fourierft": "n_frequency"}),
    MethodOption("--num-vectors", int, "vectors in the shared bank", {"vblora": "num_vectors"}),
    MethodOption("--vector-length", int, "length of each bank vector (must divide the layer widths)",
                 {"vblora": "vector_length"}),
    MethodOption("--u", int, "trainable vector size per group", {"tinylora": "u"}),
)


def config_class(method: Method):
    """The config class of a peft method; an InputError when this installation lacks it."""
    module_name, class_name = method.config_class
    module = importlib.import_module(module_name)
    cls = getattr(module, class_name, None)
    if cls is None:
        raise InputError(f"method {method.name!r} is not available in this installation "
                         f"({module_name}.{class_name} is missing; {module_name} {getattr(module, '__version__', '')})")
    return cls


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise InputError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[name]


def field_default(method: Method, field: str):
    """A config field's default, for --help; None when the class is unavailable."""
    try:
        cls = config_class(method)
    except (InputError, ImportError):
        return None
    for f in dataclasses.fields(cls):
        if f.name == field:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
    return None


def read_config_file(path: str) -> dict:
    """A method config (JSON or YAML mapping of config fields)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise InputError(f"method config file {path} does not exist")
    try:
        if file.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(file.read_text())
        else:
            data = json.loads(file.read_text())
    except Exception as error:
        raise InputError(f"cannot parse method config {path}: {str(error).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise InputError(f"method config {path} must be a mapping of config fields, got {type(data).__name__}")
    return data


def method_config_fields(method: Method, cli_values: dict, file_values: Optional[dict] = None) -> dict:
    """Config fields from a config file, overridden by the CLI options given (None means not given)."""
    fields = dict(file_values or {})
    for option in METHOD_OPTIONS:
        value = cli_values.get(option.dest)
        if value is None:
            continue
        if method.name not in option.fields:
            users = ", ".join(option.fields) or "no method"
            raise InputError(f"option {option.flag} does not apply to method {method.name!r} (it is for {users})")
        fields[option.fields[method.name]] = value
    return fields


def build_peft_config(method: Method, fields: dict, task_type: str, model):
    """The peft config for ``method`` on ``model``, filling targets the method has no default for."""
    cls = config_class(method)
    fields = dict(fields)
    fields.setdefault("task_type", task_type)
    if "target_modules" not in fields:
        targets = _default_targets(method, model)
        if targets:
            fields["target_modules"] = targets
    if method.name == "vblora" and "vector_length" not in fields:
        fields["vector_length"] = _vblora_vector_length(model)
    if method.name == "ia3" and "feedforward_modules" not in fields and isinstance(fields.get("target_modules"), list):
        fields["feedforward_modules"] = []
    _check_modules_to_save(method, fields.get("modules_to_save"), model)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise InputError(f"method {method.name!r} has no option {', '.join(unknown)}")
    try:
        return cls(**fields)
    except (TypeError, ValueError) as error:
        raise InputError(f"invalid {method.name} configuration: {str(error).splitlines()[0]}") from None


def _check_modules_to_save(method: Method, names, model) -> None:
    """peft skips a ``modules_to_save`` entry that matches no module without a word: refuse it instead."""
    if isinstance(names, str):
        raise InputError(f"{method.name}: modules_to_save={names!r} must be a list of module names, "
                         f"e.g. [{names!r}]")
    if not names or model is None:
        return
    module_names = [name for name, _ in model.named_modules() if name]
    unmatched = [entry for entry in names if not any(name.endswith(entry) for name in module_names)]
    if unmatched:
        leaves = sorted({leaf for leaf in (name.rsplit(".", 1)[-1] for name in module_names) if not leaf.isdigit()})
        raise InputError(f"{method.name}: modules_to_save entry {unmatched[0]!r} matches no module of the model "
                         f"(entries are name endings, e.g. 'layer.0.output.LayerNorm'; the model's module "
                         f"leaf names: {', '.join(leaves)})")


def _default_targets(method: Method, model) -> Optional[list[str]]:
    """LoRA's targets for methods (LoKr) that have no per-architecture default in peft; LN tuning's are the
    model's norms."""
    from peft.utils import constants

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    mapping_name = method.name.upper().replace("LN_TUNING", "LNTUNING")
    specific = getattr(constants, f"TRANSFORMERS_MODELS_TO_{mapping_name}_TARGET_MODULES_MAPPING", None)
    if method.config_class[0] == "ttpeft" or (specific and model_type in specific):
        return None
    if method.name == "ln_tuning":  # peft knows LLaMA-style names only: every norm of the model, by leaf name
        from .tuners.loretta_common import is_norm_module

        return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if is_norm_module(module)})
    return constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)


def _vblora_vector_length(model) -> int:
    """The largest of peft's usual vector lengths that divides the model's hidden size."""
    hidden = getattr(getattr(model, "config", None), "hidden_size", 256)
    for length in (256, 128, 64, 32, 16, 8):
        if hidden % length == 0:
            return length
    return 1
