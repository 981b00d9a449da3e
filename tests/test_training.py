"""Training wiring on tiny models: every method wraps, trains and reloads; runs are written atomically."""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

import ttpeft  # noqa: F401  (registers the tensor-train methods with peft)
from ttpeft import training
from ttpeft.errors import InputError
from ttpeft.methods import METHODS, build_peft_config, get_method, method_config_fields
from ttpeft.models import minilm_path
from ttpeft.tasks import get_task, load_task_data, user_task

ENCODER_METHODS = [name for name in METHODS if name not in ("loretta_rep", "loretta_adp")] + [
    pytest.param(name, marks=pytest.mark.skipif(not hasattr(ttpeft, cls), reason=f"{cls} not in this version"))
    for name, cls in (("loretta_rep", "LorettaRepConfig"), ("loretta_adp", "LorettaAdpConfig"))]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_path())


@pytest.fixture(scope="module")
def sst2():
    data = load_task_data(get_task("sst2"), "embedded")
    return data.train.select(range(32)), data.validation.select(range(16))


def tiny_bert(tokenizer, seed=0):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=2)
    return BertForSequenceClassification(config)


def tiny_llama(tokenizer, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def _settings(**kwargs):
    return training.TrainSettings(**{"epochs": 1, "batch_size": 16, "max_length": 32, "progress": False, **kwargs})


@pytest.mark.parametrize("method_name", ENCODER_METHODS)
def test_every_method_trains_only_its_parameters_and_reloads_identically(method_name, tokenizer, sst2, tmp_path):
    task, method = get_task("sst2"), get_method(method_name)
    train_set, validation = sst2
    model, _ = training.apply_method(tiny_bert(tokenizer), method, {}, training.ENCODER)
    trainable, total = training.count_parameters(model)
    assert 0 < trainable <= total
    if method_name != "full":
        assert trainable < total
        head_trainable = [n for n, p in model.named_parameters() if p.requires_grad and "classifier" in n]
        assert head_trainable, "the new classification head must train"
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    summary = training.train(model, tokenizer, task, train_set, training.ENCODER, _settings(lr=1e-2),
                             str(tmp_path / "work"))
    assert summary["steps"] == 2 and torch.isfinite(torch.tensor(summary["train_loss"]))
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed
    metrics = training.evaluate(model, tokenizer, task, validation, training.ENCODER, 32, 8, progress=False)
    run = tmp_path / "run"
    results = training.write_run(run, model, method, {"metrics": metrics})
    assert results["adapter_bytes"] > 0 and all(f.endswith(".safetensors") for f in results["adapter_files"])
    reloaded = training.load_weights(tiny_bert(tokenizer), method, run)
    again = training.evaluate(reloaded, tokenizer, task, validation, training.ENCODER, 32, 8, progress=False)
    assert again == metrics


def test_ln_tuning_trains_every_layer_norm_by_default_and_only_the_selected_ones_when_asked(tokenizer):
    def trained_norms(fields):
        model, _ = training.apply_method(tiny_bert(tokenizer), get_method("ln_tuning"), fields, training.ENCODER)
        names = {n for n, p in model.named_parameters() if p.requires_grad and not training.is_head_parameter(n)}
        assert all("LayerNorm" in n for n in names)
        return {n.split(".ln_tuning_layers")[0].removeprefix("base_model.model.") for n in names}

    every = {"bert.embeddings.LayerNorm"} | {f"bert.encoder.layer.{i}.{part}LayerNorm"
                                               for i in range(2) for part in ("attention.output.", "output.")}
    assert trained_norms({}) == every
    assert trained_norms({"target_modules": r".*layer\.\d+\.output\.LayerNorm"}) == {
        "bert.encoder.layer.0.output.LayerNorm", "bert.encoder.layer.1.output.LayerNorm"}


@pytest.mark.parametrize("method_name", ["ttlora", "lora"])
def test_modules_to_save_trains_the_named_norms_which_reload_with_the_adapter(method_name, tokenizer, sst2, tmp_path):
    task, method = get_task("sst2"), get_method(method_name)
    fields = {"modules_to_save": ["layer.1.output.LayerNorm"]}
    model, _ = training.apply_method(tiny_bert(tokenizer), method, fields, training.ENCODER)
    norms = {n for n, p in model.named_parameters() if p.requires_grad and "LayerNorm" in n}
    assert norms and all("layer.1.output.LayerNorm.modules_to_save" in n for n in norms)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in norms}
    training.train(model, tokenizer, task, sst2[0], training.ENCODER, _settings(lr=1e-2), str(tmp_path / "work"))
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in norms)
    metrics = training.evaluate(model, tokenizer, task, sst2[1], training.ENCODER, 32, 8, progress=False)
    training.write_run(tmp_path / "run", model, method, {"metrics": metrics})
    reloaded = training.load_weights(tiny_bert(tokenizer), method, tmp_path / "run")
    assert training.evaluate(reloaded, tokenizer, task, sst2[1], training.ENCODER, 32, 8, progress=False) == metrics


def test_a_modules_to_save_entry_that_matches_no_module_is_refused(tokenizer):
    with pytest.raises(InputError, match=r"ttlora: modules_to_save entry 'layer.7.output.LayerNorm' matches no module"):
        training.apply_method(tiny_bert(tokenizer), get_method("ttlora"),
                              {"modules_to_save": ["layer.1.output.LayerNorm", "layer.7.output.LayerNorm"]},
                              training.ENCODER)
    with pytest.raises(InputError, match=r"modules_to_save='classifier' must be a list of module names"):
        training.apply_method(tiny_bert(tokenizer), get_method("lora"), {"modules_to_save": "classifier"},
                              training.ENCODER)


@pytest.mark.parametrize("method_name", ["ttlora", "lora", "head"])
def test_head_lr_sets_the_classification_heads_rate_alone(method_name, tokenizer, sst2, tmp_path):
    task, method = get_task("sst2"), get_method(method_name)
    moves = {}
    for head_lr in (None, 1e-7):
        model, _ = training.apply_method(tiny_bert(tokenizer), method, {}, training.ENCODER)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        training.train(model, tokenizer, task, sst2[0], training.ENCODER, _settings(lr=1e-2, head_lr=head_lr),
                       str(tmp_path / f"work-{head_lr}"))
        moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters() if n in before}
        moves[head_lr] = ({n: d for n, d in moved.items() if training.is_head_parameter(n)},
                          {n: d for n, d in moved.items() if not training.is_head_parameter(n)})
    default_head, default_rest = moves[None]
    slow_head, slow_rest = moves[1e-7]
    assert default_head and max(default_head.values()) > 1e-3  # Adam moves by ~lr a step
    assert max(slow_head.values()) < 1e-6
    if method_name != "head":
        assert default_rest and max(slow_rest.values()) > 1e-3  # the adapter keeps --lr


@pytest.mark.parametrize("method_name", ["loretta_rep", "loretta_adp"])
def test_layer_norm_lr_sets_the_trained_layer_norms_rate_alone(method_name, tokenizer, sst2, tmp_path):
    task, method = get_task("sst2"), get_method(method_name)
    model, _ = training.apply_method(tiny_bert(tokenizer), method, {}, training.ENCODER)
    norms = training.layer_norm_parameter_ids(model)
    names = {n for n, p in model.named_parameters() if id(p) in norms}
    assert names and all("LayerNorm" in n for n in names)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    training.train(model, tokenizer, task, sst2[0], training.ENCODER, _settings(lr=1e-2, layer_norm_lr=1e-7),
                   str(tmp_path / "work"))
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters() if n in before}
    assert max(moved[n] for n in names) < 1e-6
    assert max(d for n, d in moved.items() if n not in names) > 1e-3  # adapter and head keep --lr


def test_layer_norm_lr_is_refused_when_no_layer_norm_trains(tokenizer, sst2, tmp_path):
    model, _ = training.apply_method(tiny_bert(tokenizer), get_method("ttlora"), {}, training.ENCODER)
    with pytest.raises(InputError, match=r"--layer-norm-lr 0.001: this model trains no layer norms"):
        training.train(model, tokenizer, get_task("sst2"), sst2[0], training.ENCODER,
                       _settings(lr=1e-2, layer_norm_lr=1e-3), str(tmp_path / "work"))


def tiny_regressor(tokenizer):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=1, problem_type="regression")
    return BertForSequenceClassification(config)


@pytest.mark.parametrize("method_name", ["ttlora", "lora", "head", "full"])
def test_a_regression_head_starts_at_the_mean_training_label(method_name, tokenizer, tmp_path):
    scores = tmp_path / "scores.csv"
    labels = [0.0, 1.0, 3.5, 4.5, 5.0, 2.0, 2.5, 3.0]
    pd.DataFrame({"a": [f"sentence {i}" for i in range(8)], "b": ["other"] * 8, "score": labels}).to_csv(scores)
    data = user_task(str(scores), str(scores), ["a", "b"], "score", "pearson")
    model, _ = training.apply_method(tiny_regressor(tokenizer), get_method(method_name), {}, training.ENCODER)
    # a rate far too small to move the bias: what is left is where it started
    summary = training.train(model, tokenizer, data.task, data.train, training.ENCODER,
                             _settings(lr=1e-9, batch_size=4), str(tmp_path / "work"))
    mean = sum(labels) / len(labels)
    assert summary["head_bias_init"] == pytest.approx(mean)
    biases = [p for n, p in model.named_parameters()
              if p.requires_grad and n.endswith("bias") and training.is_head_parameter(n)]
    assert biases and all(torch.allclose(b, torch.tensor([mean]), atol=1e-4) for b in biases)


def test_a_classification_head_keeps_its_initial_bias(tokenizer, sst2, tmp_path):
    model = tiny_bert(tokenizer)
    before = model.classifier.bias.detach().clone()
    summary = training.train(model, tokenizer, get_task("sst2"), sst2[0], training.ENCODER,
                             _settings(lr=1e-9), str(tmp_path / "work"))
    assert "head_bias_init" not in summary
    assert torch.allclose(model.classifier.bias, before, atol=1e-6)


def test_a_run_whose_loss_does_not_fall_says_so(tokenizer, sst2, tmp_path, caplog):
    flat = _settings(lr=1e-9, epochs=3, batch_size=8, logging_steps=1)
    with caplog.at_level("WARNING", logger="ttpeft.training"):
        summary = training.train(tiny_bert(tokenizer), tokenizer, get_task("sst2"), sst2[0], training.ENCODER, flat,
                                 str(tmp_path / "flat"))
    assert summary["loss_fell"] is False
    assert "did not fall" in caplog.text and "lower --lr than 1e-09" in caplog.text
    caplog.clear()
    learning = _settings(lr=3e-3, epochs=10, batch_size=8, logging_steps=1)
    model, _ = training.apply_method(tiny_bert(tokenizer), get_method("full"), {}, training.ENCODER)
    with caplog.at_level("WARNING", logger="ttpeft.training"):
        summary = training.train(model, tokenizer, get_task("sst2"), sst2[0], training.ENCODER, learning,
                                 str(tmp_path / "learning"))
    assert summary["loss_fell"] is True and "did not fall" not in caplog.text


def test_loss_fell_compares_the_first_and_last_thirds_of_the_logged_losses():
    assert training.loss_fell([1.0, 1.0]) is None
    assert training.loss_fell([2.0, 2.1, 1.0, 1.0, 2.0, 2.0]) is False  # a dip in the middle is not learning
    assert training.loss_fell([2.0, 2.0, 1.9, 1.8, 1.0, 1.1]) is True


def test_ttlora_options_reach_the_config():
    method = get_method("ttlora")
    fields = method_config_fields(method, {"tt_rank": 3, "tt_shape": [[8, 8], [8, 8]], "r": None},
                                  {"alpha": 4.0, "tt_rank": 9})
    assert fields == {"alpha": 4.0, "tt_rank": 3, "tt_shape": [[8, 8], [8, 8]]}  # the CLI overrides the file
    config = build_peft_config(method, fields, "SEQ_CLS", model=None)
    assert (config.tt_rank, config.alpha, config.tt_shape) == (3, 4.0, [[8, 8], [8, 8]])


def test_an_option_of_another_method_or_an_invalid_value_is_an_input_error():
    with pytest.raises(InputError, match="--bottleneck-size does not apply to method 'ttlora'"):
        method_config_fields(get_method("ttlora"), {"bottleneck_size": 64})
    with pytest.raises(InputError, match="invalid ttlora configuration"):
        build_peft_config(get_method("ttlora"), {"tt_rank": 0}, "SEQ_CLS", model=None)
    with pytest.raises(InputError, match="has no option"):
        build_peft_config(get_method("lora"), {"tt_rank": 2}, "SEQ_CLS", model=None)


def test_causal_lm_trains_on_the_answer_and_scores_label_words(tokenizer, sst2, tmp_path):
    task = get_task("sst2")
    train_set, validation = sst2
    model, _ = training.apply_method(tiny_llama(tokenizer), get_method("ttlora"), {"target_modules": ["q_proj",
                                                                                                     "v_proj"]},
                                     training.CAUSAL_LM)
    summary = training.train(model, tokenizer, task, train_set, training.CAUSAL_LM, _settings(lr=5e-2),
                             str(tmp_path / "work"))
    assert summary["steps"] == 2 and torch.isfinite(torch.tensor(summary["train_loss"]))
    metrics = training.evaluate(model, tokenizer, task, validation, training.CAUSAL_LM, 32, 8, progress=False)
    assert 0.0 <= metrics["accuracy"] <= 1.0
    with pytest.raises(InputError, match="causal LMs score label words"):
        training.apply_method(tiny_llama(tokenizer), get_method("head"), {}, training.CAUSAL_LM)


def test_an_interrupted_write_leaves_no_run_folder(tokenizer, tmp_path, monkeypatch):
    model, _ = training.apply_method(tiny_bert(tokenizer), get_method("ttlora"), {}, training.ENCODER)

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(training.json, "dumps", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        training.write_run(tmp_path / "run", model, get_method("ttlora"), {"metrics": {}})
    assert list(tmp_path.iterdir()) == []


def test_output_folder_holding_another_run_is_refused_unless_overwrite(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"identity": {"seed": 1}}))
    training.check_output_dir(run, {"seed": 1}, overwrite=False)  # the same run may be redone
    with pytest.raises(InputError, match="holds a different run.*--overwrite"):
        training.check_output_dir(run, {"seed": 2}, overwrite=False)
    training.check_output_dir(run, {"seed": 2}, overwrite=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):
        training.check_output_dir(tmp_path / "other", {"seed": 1}, overwrite=False)


def test_model_names_resolve_to_local_paths(tmp_path):
    assert Path(training.resolve_model("minilm").path, "config.json").is_file()
    with pytest.raises(InputError, match="does not exist"):
        training.resolve_model(str(tmp_path / "nowhere"))
    with pytest.raises(InputError, match="no config.json"):
        training.resolve_model(str(tmp_path))
    assert training.resolve_model("org/model").path == "org/model"  # a hub id is left to transformers
