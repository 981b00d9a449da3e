"""Loading a task's train/validation splits: a data folder, the embedded SST-2, the hub, or user files."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import datasets
import pandas as pd

from ..errors import InputError
from .metrics import METRICS, REGRESSION_METRICS
from .specs import TaskSpec

DATA_DIR_ENV = "TTPEFT_DATA_DIR"
EMBEDDED_DATA_DIR = Path(__file__).resolve().parent.parent / "data"
EMBEDDED, HUB = "embedded", "hub"


@dataclass
class TaskData:
    task: TaskSpec
    train: Optional[datasets.Dataset]
    validation: datasets.Dataset
    source: str  # where the data came from, for results.json


def has_embedded_copy(task: TaskSpec) -> bool:
    return (EMBEDDED_DATA_DIR / task.benchmark / task.name / f"{task.validation_split}.parquet").is_file()


def resolve_data_source(task: TaskSpec, data_dir: Optional[str]) -> str:
    """``--data-dir`` (a folder, ``hub`` or ``embedded``), else $TTPEFT_DATA_DIR, else the embedded copy
    when the package ships one, else the hub."""
    source = data_dir or os.environ.get(DATA_DIR_ENV) or (EMBEDDED if has_embedded_copy(task) else HUB)
    if source == EMBEDDED and not has_embedded_copy(task):
        raise InputError(f"no embedded data for task {task.qualified_name}: only glue/sst2 ships with ttpeft; "
                         f"use --data-dir DIR or --data-dir hub")
    return source


def load_task_data(task: TaskSpec, data_dir: Optional[str] = None, need_train: bool = True) -> TaskData:
    source = resolve_data_source(task, data_dir)
    splits = [task.train_split] if need_train else []
    splits.append(task.validation_split)
    if source == HUB:
        loaded = [_load_from_hub(task, split) for split in splits]
        described = f"hub:{task.hub_id}/{task.hub_config}"
    else:
        folder = EMBEDDED_DATA_DIR if source == EMBEDDED else Path(source).expanduser()
        loaded = [_load_from_folder(task, folder, split) for split in splits]
        described = EMBEDDED if source == EMBEDDED else str(folder.resolve())
    loaded = [prepare_split(task, ds, f"{task.qualified_name} {split}") for ds, split in zip(loaded, splits)]
    return TaskData(task, loaded[0] if need_train else None, loaded[-1], described)


def _load_from_folder(task: TaskSpec, folder: Path, split: str) -> datasets.Dataset:
    if not folder.is_dir():
        raise InputError(f"data folder {folder} does not exist (from --data-dir or ${DATA_DIR_ENV})")
    names = [task.name] + (["wsc.fixed"] if task.name == "wsc" else [])
    candidates = [folder / task.benchmark / name / f"{split}.parquet" for name in names]
    for path in candidates:
        if path.is_file():
            return datasets.Dataset.from_pandas(pd.read_parquet(path), preserve_index=False)
    raise InputError(f"no {split} split for task {task.qualified_name}: looked for {candidates[0]}; "
                     f"put the hub's parquet export there (<benchmark>/<task>/<split>.parquet) or use --data-dir hub")


def _load_from_hub(task: TaskSpec, split: str) -> datasets.Dataset:
    try:
        return datasets.load_dataset(task.hub_id, task.hub_config, split=split)
    except Exception as error:  # offline, unknown dataset, network: all end here for the user
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InputError(f"could not load {task.hub_id} {task.hub_config} split {split} from the Hugging Face hub "
                         f"({reason}); give a local copy with --data-dir DIR or ${DATA_DIR_ENV} "
                         f"(layout <benchmark>/<task>/<split>.parquet)") from None


def prepare_split(task: TaskSpec, dataset: datasets.Dataset, where: str) -> datasets.Dataset:
    """Check fields and labels, add derived fields, and turn labels into class indices or floats."""
    if len(dataset) == 0:
        raise InputError(f"{where} is empty")
    needed = set(task.text_fields) - set(_derived_names(task, dataset))
    missing = sorted(needed - set(dataset.column_names))
    if missing:
        raise InputError(f"{where} has no column {', '.join(map(repr, missing))}; its columns: "
                         f"{', '.join(dataset.column_names)}")
    if task.label_field not in dataset.column_names:
        raise InputError(f"{where} has no label column {task.label_field!r}; its columns: "
                         f"{', '.join(dataset.column_names)}")
    if task.derive is not None:
        dataset = dataset.map(task.derive)
    labels = dataset[task.label_field]
    dataset = dataset.remove_columns(task.label_field).add_column("labels", _label_values(task, labels, where))
    return dataset


def _derived_names(task: TaskSpec, dataset: datasets.Dataset) -> list[str]:
    if task.derive is None:
        return []
    return list(task.derive(dataset[0]).keys())


def _label_values(task: TaskSpec, labels: Sequence, where: str) -> list:
    if task.is_regression:
        try:
            return [float(v) for v in labels]
        except (TypeError, ValueError):
            raise InputError(f"{where}: regression labels must be numbers, got e.g. {labels[0]!r}") from None
    names = list(task.label_names)
    index = {name: i for i, name in enumerate(names)}
    values = []
    for value in labels:
        if isinstance(value, str) and value in index:
            values.append(index[value])
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and int(value) == value \
                and 0 <= int(value) < len(names):
            values.append(int(value))
        else:
            bad = sorted({str(v) for v in labels if not (v in index or (isinstance(v, (int, float))
                                                                        and v in range(len(names))))})
            raise InputError(f"{where}: label values {', '.join(bad[:5])} are outside the task's labels "
                             f"{', '.join(f'{i}={n}' for i, n in enumerate(names))}")
    return values


def read_table(path: str) -> datasets.Dataset:
    """A user's CSV, JSON lines or Parquet file as a dataset."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise InputError(f"data file {path} does not exist")
    suffix = file.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            frame = pd.read_csv(file, sep="\t" if suffix == ".tsv" else ",")
        elif suffix in (".json", ".jsonl"):
            frame = pd.read_json(file, lines=True)
        elif suffix in (".parquet", ".pq"):
            frame = pd.read_parquet(file)
        else:
            raise InputError(f"data file {path}: unknown format {suffix!r}; use .csv, .tsv, .jsonl or .parquet")
    except InputError:
        raise
    except Exception as error:
        raise InputError(f"cannot read data file {path}: {str(error).splitlines()[0]}") from None
    return datasets.Dataset.from_pandas(frame, preserve_index=False)


def user_task(train_file: Optional[str], validation_file: Optional[str], text_fields: Optional[Sequence[str]],
              label_field: str = "label", metric: Optional[str] = None,
              label_names: Optional[Sequence[str]] = None) -> TaskData:
    """A task from the user's own files: classification, or regression when the metric is a correlation/MSE."""
    if not validation_file:
        raise InputError("--validation-file is required with your own data")
    if not text_fields:
        raise InputError("--text-fields is required with your own data (one or two column names)")
    if len(text_fields) > 2:
        raise InputError(f"--text-fields takes one or two columns, got {len(text_fields)}")
    metric = metric or "accuracy"
    if metric not in METRICS:
        raise InputError(f"unknown metric {metric!r}; valid metrics: {', '.join(METRICS)}")
    train = read_table(train_file) if train_file else None
    validation = read_table(validation_file)
    regression = metric in REGRESSION_METRICS
    if not regression and not label_names:
        reference = train if train is not None else validation
        if label_field not in reference.column_names:
            raise InputError(f"{train_file or validation_file} has no label column {label_field!r}; its columns: "
                             f"{', '.join(reference.column_names)}")
        label_names = [str(v) for v in sorted(set(reference[label_field]), key=_sort_key)]
    task = TaskSpec(name="custom", benchmark="user", encoder_texts=tuple("{" + f + "}" for f in text_fields),
                    label_names=None if regression else tuple(str(n) for n in label_names),
                    metrics=(metric,), label_field=label_field,
                    prompt="\n".join("{" + f + "}" for f in text_fields) + "\nAnswer:",
                    label_words=None if regression else tuple(" " + str(n) for n in label_names))
    if not regression:
        # file labels may be ints or strings; compare them as the strings they print as
        train, validation = (_stringify_labels(ds, label_field) if ds is not None else None
                             for ds in (train, validation))
    train = prepare_split(task, train, train_file) if train is not None else None
    validation = prepare_split(task, validation, validation_file)
    return TaskData(task, train, validation, f"files:{train_file},{validation_file}")


def _sort_key(value):
    return (0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value))


def _stringify_labels(dataset: datasets.Dataset, label_field: str) -> datasets.Dataset:
    if label_field not in dataset.column_names:
        return dataset
    values = [str(v) for v in dataset[label_field]]
    return dataset.remove_columns(label_field).add_column(label_field, values)
