"""Tiny models built in the tests (no downloads)."""

import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel


class MLP(nn.Module):
    def __init__(self, width: int = 24, hidden: int = 36):
        super().__init__()
        self.lin0 = nn.Linear(width, hidden)
        self.lin1 = nn.Linear(hidden, width)
        self.head = nn.Linear(width, 2)

    def forward(self, x):
        return self.head(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


def mlp(seed: int = 0, **kwargs) -> MLP:
    torch.manual_seed(seed)
    return MLP(**kwargs).eval()


def tiny_bert(seed: int = 0, hidden: int = 32) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=64, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=32, num_labels=2)
    return BertForSequenceClassification(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=64, n_embd=24, n_layer=2, n_head=2, n_positions=32)
    return GPT2LMHeadModel(config).eval()


def token_batch(seed: int = 1, batch: int = 3, length: int = 8) -> torch.Tensor:
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, inputs):
    with torch.no_grad():
        if isinstance(inputs, torch.Tensor) and inputs.dtype == torch.long:
            return model(input_ids=inputs).logits
        return model(inputs)


def save_tiny_classifier(folder, seed: int = 0) -> str:
    """A tiny BERT classifier saved with MiniLM's tokenizer, for ``ttpeft train --model <folder>``. Dropout is
    off, so that runs splitting the same batches differently (processes) compute the same updates."""
    from transformers import AutoTokenizer

    from ttpeft.models import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=2, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def save_tiny_llama(folder, seed: int = 0) -> str:
    """A tiny LLaMA-architecture causal LM saved with MiniLM's tokenizer, for ``ttpeft train --model <folder>``."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ttpeft.models import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
