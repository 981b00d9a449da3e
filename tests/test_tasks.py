"""Task specs, data loading, metrics and the causal-LM prompt view of tasks."""

import os
import string
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ttpeft.errors import InputError
from ttpeft.tasks import TASKS, compute_metrics, get_task, load_task_data, user_task
from ttpeft.tasks import loading
from ttpeft.tasks.prompts import answer_candidates, answer_log_likelihoods, encode_prompt_answer, \
    lm_training_features, render_prompt

SHARED_DATA = Path(os.environ.get("TTPEFT_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def test_every_issue_task_resolves_by_name():
    glue = "sst2 cola mrpc stsb qqp mnli qnli rte wnli".split()
    super_glue = "boolq cb copa rte wic wsc multirc".split()
    assert {get_task(f"glue/{n}").qualified_name for n in glue} == {f"glue/{n}" for n in glue}
    assert {get_task(f"super_glue/{n}").qualified_name for n in super_glue} == {f"super_glue/{n}" for n in super_glue}
    assert get_task("rte").benchmark == "glue"  # the bare ambiguous name is GLUE's
    assert get_task("SuperGLUE-RTE").qualified_name == "super_glue/rte"
    assert get_task("boolq").benchmark == "super_glue"


def test_unknown_task_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown task 'sst3'.*sst2"):
        get_task("sst3")


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.qualified_name)
def test_templates_use_only_declared_fields_and_labels_have_answers(task):
    example = {name: f"<{name}>" for name in task.text_fields}
    example.update({"question": "cause", "premise": "P.", "choice1": "A", "choice2": "B",
                    "idx": {"paragraph": 0, "question": 1, "answer": 2}})
    if task.derive:
        example.update(task.derive(example))
    for template in task.encoder_texts:
        template.format(**example)
    if task.is_regression:
        assert task.prompt is None
        return
    prompt_fields = {name for _, name, _, _ in string.Formatter().parse(task.prompt) if name}
    assert prompt_fields <= set(example)
    assert len(answer_candidates(task, example)) == task.num_labels


def test_copa_prompt_continues_the_premise_with_each_choice():
    task = get_task("copa")
    example = {"premise": "The man broke his toe.", "question": "cause", "choice1": "He dropped a hammer.",
               "choice2": "He went to sleep.", "label": 0}
    example.update(task.derive(example))
    assert render_prompt(task, example) == "The man broke his toe because"
    assert answer_candidates(task, example) == [" he dropped a hammer.", " he went to sleep."]


def test_metrics_match_their_definitions():
    preds, refs = [1, 0, 1, 1, 0, 0], [1, 0, 0, 1, 1, 0]
    result = compute_metrics(["accuracy", "f1", "mcc", "macro_f1"], preds, refs)
    tp, fp, fn, tn = 2, 1, 1, 2
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert result["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert result["mcc"] == pytest.approx((tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    assert result["macro_f1"] == pytest.approx(4 / 6)  # both classes have F1 2/3
    x = np.array([0.1, 0.5, 0.2, 0.9])
    y = np.array([0.0, 1.0, 0.5, 2.0])
    assert compute_metrics(["pearson"], x, y)["pearson"] == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert compute_metrics(["spearman"], x, y)["spearman"] == pytest.approx(1.0)
    # exact match counts a group right only if all its answers are
    em = compute_metrics(["em"], [1, 0, 1, 1], [1, 0, 0, 1], groups=["a", "a", "b", "b"])["em"]
    assert em == pytest.approx(0.5)


def test_embedded_sst2_has_the_full_validation_split(monkeypatch):
    monkeypatch.delenv(loading.DATA_DIR_ENV, raising=False)
    data = load_task_data(get_task("sst2"))
    assert data.source == "embedded"
    assert len(data.validation) == 872
    assert 1000 <= len(data.train) <= 10000
    assert set(data.validation["labels"]) == {0, 1} and set(data.train["labels"]) == {0, 1}


def test_embedded_copy_exists_only_for_sst2(monkeypatch):
    monkeypatch.delenv(loading.DATA_DIR_ENV, raising=False)
    with pytest.raises(InputError, match="no embedded data"):
        load_task_data(get_task("cola"), "embedded")


def _write_split(folder: Path, task: str, split: str, frame: pd.DataFrame) -> None:
    path = folder / task / f"{split}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path)


def test_data_dir_in_hub_layout_and_environment_variable(tmp_path, monkeypatch):
    frame = pd.DataFrame({"premise": ["a", "b", "c"], "hypothesis": ["d", "e", "f"], "idx": [0, 1, 2],
                          "label": [0, 2, 1]})
    for split in ("train", "validation"):
        _write_split(tmp_path, "super_glue/cb", split, frame)
    data = load_task_data(get_task("cb"), str(tmp_path))
    assert data.validation["labels"] == [0, 2, 1]
    monkeypatch.setenv(loading.DATA_DIR_ENV, str(tmp_path))
    assert load_task_data(get_task("cb")).source == str(tmp_path.resolve())


def test_missing_task_data_says_where_it_looked(tmp_path):
    with pytest.raises(InputError, match=r"looked for .*glue/mrpc/train\.parquet.*--data-dir hub"):
        load_task_data(get_task("mrpc"), str(tmp_path))


def test_hub_failure_says_how_to_provide_data(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the hub")

    monkeypatch.setattr(loading.datasets, "load_dataset", offline)
    with pytest.raises(InputError, match=r"nyu-mll/glue mrpc.*Couldn't reach.*--data-dir"):
        load_task_data(get_task("mrpc"), "hub")


@pytest.mark.parametrize("labels, message", [([0, 1, 5], "outside the task's labels"),
                                              ([0, 1, -1], "outside the task's labels")])
def test_labels_outside_the_task_are_refused(tmp_path, labels, message):
    frame = pd.DataFrame({"sentence": ["x", "y", "z"], "label": labels})
    for split in ("train", "validation"):
        _write_split(tmp_path, "glue/sst2", split, frame)
    with pytest.raises(InputError, match=message):
        load_task_data(get_task("sst2"), str(tmp_path))


def test_missing_label_column_and_empty_split_are_refused(tmp_path):
    _write_split(tmp_path, "glue/sst2", "train", pd.DataFrame({"sentence": ["x"], "target": [1]}))
    _write_split(tmp_path, "glue/sst2", "validation", pd.DataFrame({"sentence": ["x"], "label": [1]}))
    with pytest.raises(InputError, match="no label column 'label'"):
        load_task_data(get_task("sst2"), str(tmp_path))
    _write_split(tmp_path, "glue/sst2", "train", pd.DataFrame({"sentence": pd.Series([], dtype=str),
                                                               "label": pd.Series([], dtype=int)}))
    with pytest.raises(InputError, match="is empty"):
        load_task_data(get_task("sst2"), str(tmp_path))


@pytest.mark.skipif(not (SHARED_DATA / "glue" / "rte").is_dir(), reason="shared benchmark data not present")
def test_real_rte_from_the_shared_data_folder():
    data = load_task_data(get_task("glue/rte"), str(SHARED_DATA))
    assert len(data.validation) == 277 and set(data.validation["labels"]) == {0, 1}


def test_user_files_classification_with_string_labels_and_regression(tmp_path):
    train = tmp_path / "train.csv"
    pd.DataFrame({"text": ["good", "bad", "fine"], "y": ["pos", "neg", "pos"]}).to_csv(train, index=False)
    valid = tmp_path / "valid.jsonl"
    pd.DataFrame({"text": ["ok", "awful"], "y": ["pos", "neg"]}).to_json(valid, orient="records", lines=True)
    data = user_task(str(train), str(valid), ["text"], "y", "f1")
    assert data.task.label_names == ("neg", "pos") and data.validation["labels"] == [1, 0]
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"text": ["x"], "y": ["maybe"]}).to_csv(bad, index=False)
    with pytest.raises(InputError, match="maybe"):
        user_task(str(train), str(bad), ["text"], "y", "accuracy")
    scores = tmp_path / "scores.parquet"
    pd.DataFrame({"a": ["x", "y"], "b": ["z", "w"], "score": [0.5, 4.0]}).to_parquet(scores)
    regression = user_task(str(scores), str(scores), ["a", "b"], "score", "pearson")
    assert regression.task.is_regression and regression.validation["labels"] == [0.5, 4.0]


@pytest.fixture(scope="module")
def bert_tokenizer():
    from transformers import AutoTokenizer

    from ttpeft.models import minilm_path

    return AutoTokenizer.from_pretrained(minilm_path())


def test_long_prompts_are_cut_from_the_left_keeping_the_answer(bert_tokenizer):
    prompt = " ".join(f"word{i}" for i in range(100)) + " It was"
    ids, answer_len = encode_prompt_answer(bert_tokenizer, prompt, " great fun", max_length=16)
    answer_ids = bert_tokenizer(" great fun", add_special_tokens=False)["input_ids"]
    assert len(ids) == 16 and ids[-answer_len:] == answer_ids
    features = lm_training_features(get_task("sst2"), bert_tokenizer, {"sentence": "fun", "labels": 1}, 32)
    trained = [t for t, label in zip(features["input_ids"], features["labels"]) if label != -100]
    gold_word = get_task("sst2").label_words[1]
    assert trained == bert_tokenizer(gold_word, add_special_tokens=False)["input_ids"]


def test_answer_log_likelihoods_are_the_summed_token_log_probabilities(bert_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(bert_tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)).eval()
    task = get_task("sst2")
    examples = [{"sentence": "a fine film"}, {"sentence": "dull and far too long for anyone"}]
    scores = answer_log_likelihoods(model, bert_tokenizer, task, examples, max_length=64, batch_size=3)
    assert scores.shape == (2, 2)
    for row, example in enumerate(examples):
        for column, word in enumerate(task.label_words):
            ids, n = encode_prompt_answer(bert_tokenizer, render_prompt(task, example), word, 64)
            with torch.no_grad():
                log_probs = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
            expected = sum(log_probs[t - 1, ids[t]].item() for t in range(len(ids) - n, len(ids)))
            assert scores[row, column].item() == pytest.approx(expected, abs=1e-4)
