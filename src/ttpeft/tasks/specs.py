"""Declarative specs of the GLUE and SuperGLUE tasks: fields, labels, metrics, prompts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional


@dataclass(frozen=True)
class TaskSpec:
    """One classification or regression task.

    ``encoder_texts`` are ``str.format`` templates over an example's fields giving the one or two texts
    an encoder reads; ``prompt`` and ``label_words`` render it for a causal LM, which answers by the
    likelihood of each label word (or, with ``choice_fields``, of each example's own choices).
    """

    name: str
    benchmark: str  # "glue", "super_glue" or "user"
    encoder_texts: tuple[str, ...]
    label_names: Optional[tuple[str, ...]]  # None: regression
    metrics: tuple[str, ...]  # the first is the headline metric
    label_field: str = "label"
    train_split: str = "train"
    validation_split: str = "validation"
    prompt: Optional[str] = None
    label_words: Optional[tuple[str, ...]] = None
    choice_fields: Optional[tuple[str, ...]] = None  # per-example answers (COPA)
    group_field: Optional[str] = None  # examples sharing a question (MultiRC exact match)
    derive: Optional[Callable[[dict], dict]] = None  # extra fields the templates use, from an example
    hub_id: str = ""
    hub_config: str = ""
    aliases: tuple[str, ...] = field(default=())

    @property
    def is_regression(self) -> bool:
        return self.label_names is None

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)

    @property
    def qualified_name(self) -> str:
        return f"{self.benchmark}/{self.name}"

    @property
    def text_fields(self) -> list[str]:
        """Fields the encoder templates read (checked against the data's columns)."""
        import string

        names = []
        for template in self.encoder_texts:
            for _, name, _, _ in string.Formatter().parse(template):
                if name and name not in names:
                    names.append(name)
        return names


def _copa_fields(example: dict) -> dict:
    """COPA's prompt continues the premise with "because"/"so" and a lower-cased choice."""
    return {"premise_stem": example["premise"].rstrip().rstrip("."),
            "connective": "because" if example["question"] == "cause" else "so",
            **{f"{c}_answer": " " + example[c][:1].lower() + example[c][1:] for c in ("choice1", "choice2")}}


def _multirc_fields(example: dict) -> dict:
    """MultiRC's exact match is per question: answers sharing paragraph and question form a group."""
    idx = example.get("idx")
    group = f"{idx['paragraph']}-{idx['question']}" if isinstance(idx, dict) else example["question"]
    return {"question_group": group}


GLUE_HUB = "nyu-mll/glue"
SUPER_GLUE_HUB = "aps/super_glue"
YES_NO = (" No", " Yes")
ENTAILMENT_YES_NO = (" Yes", " No")  # label 0 is entailment in GLUE/SuperGLUE RTE, QNLI


def _glue(name, encoder_texts, label_names, metrics, prompt, label_words, **kwargs) -> TaskSpec:
    return TaskSpec(name=name, benchmark="glue", encoder_texts=encoder_texts, label_names=label_names,
                    metrics=metrics, prompt=prompt, label_words=label_words, hub_id=GLUE_HUB,
                    hub_config=kwargs.pop("hub_config", name), **kwargs)


def _super_glue(name, encoder_texts, label_names, metrics, prompt, label_words, **kwargs) -> TaskSpec:
    return TaskSpec(name=name, benchmark="super_glue", encoder_texts=encoder_texts, label_names=label_names,
                    metrics=metrics, prompt=prompt, label_words=label_words, hub_id=SUPER_GLUE_HUB,
                    hub_config=kwargs.pop("hub_config", name), **kwargs)


# Prompts follow the MeZO / LoRETTA templates, except SST-2's: MeZO's "<sentence> It was terrible/great"
# suits large LMs, while small ones (SmolLM2-135M) answer "great" to almost everything; naming the labels
# works for both. Label words start with a space so they tokenize as words.
TASKS: tuple[TaskSpec, ...] = (
    _glue("sst2", ("{sentence}",), ("negative", "positive"), ("accuracy",),
          "Review: {sentence}\nSentiment:", (" negative", " positive")),
    _glue("cola", ("{sentence}",), ("unacceptable", "acceptable"), ("mcc", "accuracy"),
          "{sentence}\nQuestion: Is this sentence grammatical? Yes or No?\nAnswer:", YES_NO),
    _glue("mrpc", ("{sentence1}", "{sentence2}"), ("not_equivalent", "equivalent"), ("f1", "accuracy"),
          "{sentence1}\nQuestion: Does this mean the same as \"{sentence2}\"? Yes or No?\nAnswer:", YES_NO),
    _glue("stsb", ("{sentence1}", "{sentence2}"), None, ("pearson", "spearman"), None, None),
    _glue("qqp", ("{question1}", "{question2}"), ("not_duplicate", "duplicate"), ("f1", "accuracy"),
          "{question1}\nQuestion: Is this the same question as \"{question2}\"? Yes or No?\nAnswer:", YES_NO),
    _glue("mnli", ("{premise}", "{hypothesis}"), ("entailment", "neutral", "contradiction"), ("accuracy",),
          "{premise}\nQuestion: {hypothesis} True, False or Neither?\nAnswer:", (" True", " Neither", " False"),
          validation_split="validation_matched"),
    _glue("qnli", ("{question}", "{sentence}"), ("entailment", "not_entailment"), ("accuracy",),
          "{sentence}\nQuestion: Does this answer \"{question}\"? Yes or No?\nAnswer:", ENTAILMENT_YES_NO),
    _glue("rte", ("{sentence1}", "{sentence2}"), ("entailment", "not_entailment"), ("accuracy",),
          "{sentence1}\nDoes this mean that \"{sentence2}\" is true? Yes or No?\nAnswer:", ENTAILMENT_YES_NO),
    _glue("wnli", ("{sentence1}", "{sentence2}"), ("not_entailment", "entailment"), ("accuracy",),
          "{sentence1}\nDoes this mean that \"{sentence2}\" is true? Yes or No?\nAnswer:", YES_NO),
    _super_glue("boolq", ("{question}", "{passage}"), ("False", "True"), ("accuracy",),
                "{passage}\nQuestion: {question}?\nAnswer:", YES_NO),
    _super_glue("cb", ("{premise}", "{hypothesis}"), ("entailment", "contradiction", "neutral"),
                ("accuracy", "macro_f1"),
                "{premise}\nQuestion: {hypothesis} True, False or Neither?\nAnswer:", (" True", " False", " Neither")),
    _super_glue("copa", ("{premise} What was the {question}?", "1: {choice1} 2: {choice2}"),
                ("choice1", "choice2"), ("accuracy",),
                "{premise_stem} {connective}", None, choice_fields=("choice1_answer", "choice2_answer"),
                derive=_copa_fields),
    _super_glue("rte", ("{premise}", "{hypothesis}"), ("entailment", "not_entailment"), ("accuracy",),
                "{premise}\nDoes this mean that \"{hypothesis}\" is true? Yes or No?\nAnswer:", ENTAILMENT_YES_NO),
    _super_glue("wic", ("{word}: {sentence1}", "{sentence2}"), ("False", "True"), ("accuracy",),
                "Does the word \"{word}\" have the same meaning in these two sentences? Yes or No?\n"
                "{sentence1}\n{sentence2}\nAnswer:", YES_NO),
    _super_glue("wsc", ("{text}", "Does \"{span2_text}\" refer to \"{span1_text}\"?"), ("False", "True"),
                ("accuracy",),
                "{text}\nIn the previous sentence, does the pronoun \"{span2_text}\" refer to {span1_text}? "
                "Yes or No?\nAnswer:", YES_NO, hub_config="wsc.fixed"),
    _super_glue("multirc", ("{paragraph}", "{question} {answer}"), ("False", "True"), ("f1a", "em"),
                "{paragraph}\nQuestion: {question}\nI found this answer \"{answer}\". Is that correct? Yes or No?\n"
                "Answer:", YES_NO, group_field="question_group",
                derive=_multirc_fields),
)

AMBIGUOUS_DEFAULTS = {"rte": "glue"}  # bare "rte" means GLUE's; SuperGLUE's is "super_glue/rte"


def task_names() -> list[str]:
    """Every accepted --task value, bare names first."""
    bare = sorted({t.name for t in TASKS})
    return bare + [t.qualified_name for t in TASKS]


def get_task(name: str) -> TaskSpec:
    """The spec for ``sst2``, ``glue/rte``, ``super_glue/rte``, ``superglue_rte`` … (case-insensitive)."""
    key = name.strip().lower().replace("-", "_").replace("superglue", "super_glue")
    for sep in ("/", ":"):
        if sep in key:
            benchmark, _, bare = key.partition(sep)
            break
    else:
        benchmark, bare = "", key
        for prefix in ("super_glue_", "glue_"):
            if key.startswith(prefix) and key[len(prefix):] in {t.name for t in TASKS}:
                benchmark, bare = prefix[:-1], key[len(prefix):]
    matches = [t for t in TASKS if t.name == bare and (not benchmark or t.benchmark == benchmark)]
    if len(matches) > 1:
        matches = [t for t in matches if t.benchmark == AMBIGUOUS_DEFAULTS.get(bare)]
    if not matches:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(task_names())}")
    return matches[0]
