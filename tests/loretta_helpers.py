"""Tiny models and helpers for the LoRETTA tests (no downloads)."""

import os
import subprocess
import sys
import textwrap

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
)

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
VOCAB = 64


def tiny_bert(seed: int = 0, hidden: int = 32) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=32, num_labels=2)
    return BertForSequenceClassification(config).eval()


def tiny_roberta(seed: int = 0, hidden: int = 32) -> RobertaForSequenceClassification:
    torch.manual_seed(seed)
    config = RobertaConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=2 * hidden, max_position_embeddings=40, num_labels=3)
    return RobertaForSequenceClassification(config).eval()


def tiny_llama(seed: int = 0, hidden: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=48, max_position_embeddings=32)
    return LlamaForCausalLM(config).eval()


def token_batch(seed: int = 1, batch: int = 3, length: int = 8) -> torch.Tensor:
    # ids from 3 up: RoBERTa's padding id is 1
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=inputs).logits


def train_steps(model, inputs: torch.Tensor, steps: int = 3, lr: float = 0.05) -> None:
    """A few SGD steps on a loss that moves every trainable parameter."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.SGD(params, lr=lr)
    for _ in range(steps):
        optimiser.zero_grad()
        out = model(input_ids=inputs).logits
        loss = (out.float() ** 2).mean() + out.float().mean()
        loss.backward()
        optimiser.step()
    model.eval()


def run_fresh_python(code: str) -> subprocess.CompletedProcess:
    """Run code in a new interpreter that can import this folder's helpers."""
    prelude = f"import sys; sys.path.insert(0, {TESTS_DIR!r})\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300)


def load_in_fresh_process(builder: str, adapter_dir, inputs_path, out_path) -> None:
    """Load ``adapter_dir`` onto ``loretta_helpers.<builder>()`` in a new process and save its logits."""
    result = run_fresh_python(f"""
        import torch, ttpeft
        from peft import PeftModel
        import loretta_helpers as h
        model = PeftModel.from_pretrained(h.{builder}(), {str(adapter_dir)!r}).eval()
        torch.save(h.logits(model, torch.load({str(inputs_path)!r})), {str(out_path)!r})
    """)
    assert result.returncode == 0, result.stderr[-3000:]


def logits_after_reload(model, inputs: torch.Tensor, builder: str, tmp_path) -> torch.Tensor:
    """Save ``model``'s adapter, load it onto ``loretta_helpers.<builder>()`` in a new process, and return the
    reloaded model's logits for ``inputs``."""
    model.save_pretrained(tmp_path / "adapter")
    torch.save(inputs, tmp_path / "inputs.pt")
    load_in_fresh_process(builder, tmp_path / "adapter", tmp_path / "inputs.pt", tmp_path / "out.pt")
    return torch.load(tmp_path / "out.pt")
