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
