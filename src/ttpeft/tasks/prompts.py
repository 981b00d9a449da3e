"""Causal-LM view of a task: each example becomes a prompt, each answer a label word scored by likelihood."""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import InputError
from .specs import TaskSpec


def check_prompt_task(task: TaskSpec) -> None:
    if task.is_regression or task.prompt is None:
        raise InputError(f"task {task.qualified_name} is a regression task: a causal LM scores label words, "
                         "so it needs classes; use an encoder model (e.g. the default MiniLM)")


def render_prompt(task: TaskSpec, example: dict) -> str:
    return task.prompt.format(**example)


def answer_candidates(task: TaskSpec, example: dict) -> list[str]:
    """The texts the LM may continue the prompt with, one per class, in label order."""
    if task.choice_fields:
        return [example[name] for name in task.choice_fields]
    return list(task.label_words)


def encode_prompt_answer(tokenizer, prompt: str, answer: str, max_length: int) -> tuple[list[int], int]:
    """Token ids of prompt + answer and the answer's length; the prompt is cut from the left to fit."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if len(answer_ids) >= max_length:
        answer_ids = answer_ids[: max_length - 1]
    keep = max_length - len(answer_ids)
    if len(prompt_ids) > keep:
        # keep a leading BOS token if the tokenizer adds one, then the end of the prompt
        bos = prompt_ids[:1] if prompt_ids and prompt_ids[0] == tokenizer.bos_token_id else []
        prompt_ids = bos + prompt_ids[len(prompt_ids) - (keep - len(bos)):]
    return prompt_ids + answer_ids, len(answer_ids)


def lm_training_features(task: TaskSpec, tokenizer, example: dict, max_length: int) -> dict:
    """Input ids and LM labels that train only on the gold answer's tokens."""
    answer = answer_candidates(task, example)[example["labels"]]
    ids, answer_len = encode_prompt_answer(tokenizer, render_prompt(task, example), answer, max_length)
    return {"input_ids": ids, "attention_mask": [1] * len(ids),
            "labels": [-100] * (len(ids) - answer_len) + ids[len(ids) - answer_len:]}


@torch.no_grad()
def answer_log_likelihoods(model, tokenizer, task: TaskSpec, examples, max_length: int, batch_size: int,
                           progress: Optional[callable] = None) -> torch.Tensor:
    """``(examples, classes)`` summed log-probabilities of each candidate answer given the prompt."""
    pairs = []
    for example in examples:
        prompt = render_prompt(task, example)
        pairs.extend(encode_prompt_answer(tokenizer, prompt, answer, max_length)
                     for answer in answer_candidates(task, example))
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (ids, _) in enumerate(chunk):  # right padding keeps positions of real tokens unchanged
            input_ids[row, :len(ids)] = torch.tensor(ids)
            attention[row, :len(ids)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits.float()
        log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
        targets = input_ids[:, 1:].to(device)
        token_scores = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        for row, (ids, answer_len) in enumerate(chunk):
            # token t is predicted at position t-1
            scores.append(token_scores[row, len(ids) - 1 - answer_len:len(ids) - 1].sum().item())
        if progress:
            progress(len(chunk))
    num_classes = len(pairs) // max(len(examples), 1)
    return torch.tensor(scores).view(len(examples), num_classes)
