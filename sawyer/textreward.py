"""Offline, non-neural text rewards for notebook 01 on the ``cpu`` preset: "more neutral, more grammatical".

The original workshop rewarded FLAN-T5 summaries with two RoBERTa classifiers (CoLA "acceptable" and
twitter-roberta "neutral"). Neither ships on PyPI, so the offline ``cpu`` preset uses two real, long-standing
tools that do, and that run in microseconds per sentence on a CPU:

- **VADER** (``vaderSentiment``, Hutto & Gilbert 2014, MIT): a sentiment lexicon of ~7,500 words rated by
  people, plus rules for negation, intensifiers ("very"), capitals and "!". ``polarity_scores`` splits a
  text into ``neg``/``neu``/``pos`` proportions; we reward **``neu``**, the share of the text that carries no
  sentiment. "The furious minister slammed the disastrous plan" scores 0.34; "The government announced a new
  budget" scores 1.0. Typical range 0.5-1.0 on news text.
- **Harper** (``harper-py``, Apache-2.0): an offline English grammar checker (the engine behind the Harper
  editor plug-ins), rule-based, with spelling, agreement ("he go"), repetition ("the the"), capitalisation and
  punctuation rules. We reward **``-errors per 10 words``**: 0 for clean text, -1 for one error every ten
  words. Typical range -1.5 to 0.

Both are *components* with the interface of ``sawyer.reward.ClassifierReward`` (``name``, ``weight``,
``index``, ``logits(texts) -> (B, 1)``, ``score(texts) -> (B,)``, and ``(prompts, responses) -> (B,)``), so
``sawyer.reward.CombinedReward`` adds them up and breaks them down exactly as it does the classifiers, and
``summary_reward(cfg)`` picks them by id: ``cola_model="harper"`` / ``cola_label="grammar"`` and
``sentiment_model="vader"`` / ``sentiment_label="neu"``. Only the preset's ids change; notebook 01 is the same.

**How these differ from the classifiers, honestly.** A lexicon cannot read context ("not bad" is handled by a
rule, sarcasm is not) and a rule-based checker misses word salad that breaks no rule: Harper passes
"budget Monday the new announced a government on." except for its capital letter. So the policy can win
"neutral" by dropping emotive words (the story we want to see: "slammed" -> "said"), and can win "grammar" by
writing short, plain sentences; an empty reply would score a perfect grammar, which is why VADER gives the
empty string ``neu = 0`` and the PPO config asks for a minimum number of new tokens. Read the summaries.
"""
from __future__ import annotations

import re
from typing import Sequence

import torch

#: ``model id -> its labels``: the ids ``summary_reward`` reads as offline text scorers instead of classifiers.
TEXT_SCORERS = {"vader": ("neu",), "harper": ("grammar",)}

_WORD = re.compile(r"[A-Za-z0-9']+")


def n_words(text: str) -> int:
    """Word count used for error rates: runs of letters, digits and apostrophes."""
    return len(_WORD.findall(text))


class _TextComponent:
    """Shared plumbing: a per-text scorer exposed with ``ClassifierReward``'s interface."""

    index = 0  # the single column of ``logits``

    def __init__(self, weight: float = 1.0, name: str | None = None):
        self.weight, self.name = float(weight), name or self.default_name

    def score_one(self, text: str) -> float:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def score(self, texts: Sequence[str]) -> torch.Tensor:
        """The raw (unweighted) score of each text, ``(B,)`` float32."""
        if isinstance(texts, str):
            raise TypeError(f"{self.name}: pass a list of texts, not one string")
        return torch.tensor([self.score_one(t) for t in texts], dtype=torch.float32)

    def logits(self, texts: Sequence[str]) -> torch.Tensor:
        """``score`` as one column, ``(B, 1)``: what ``CombinedReward`` reads (``index`` 0)."""
        return self.score(texts)[:, None]

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        if len(prompts) != len(responses):
            raise ValueError(f"{self.name}: {len(prompts)} prompts but {len(responses)} responses")
        return self.weight * self.score(responses)


class VaderNeutral(_TextComponent):
    """VADER's ``neu`` proportion in [0, 1]: 1 = no sentiment-bearing words. The empty text scores 0."""

    default_name = "neutral"

    def __init__(self, weight: float = 1.0, name: str | None = None):
        super().__init__(weight, name)
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.analyzer = SentimentIntensityAnalyzer()  # reads its lexicon from the wheel: no network

    def score_one(self, text: str) -> float:
        return float(self.analyzer.polarity_scores(text)["neu"]) if text.strip() else 0.0


class HarperGrammar(_TextComponent):
    """``-(Harper errors per 10 words)``: 0 for clean text, -1 for one error every ten words.

    ``errors(text)`` lists what Harper flagged as ``(kind, problem text)``, to show *why* a text lost reward.
    """

    default_name = "grammar"

    def __init__(self, weight: float = 1.0, name: str | None = None, per_words: int = 10):
        super().__init__(weight, name)
        import harper

        self.linter = harper.Linter()  # builds its dictionary once (about a second; reuse the object)
        self.per_words = per_words

    def errors(self, text: str) -> list[tuple[str, str]]:
        return [(lint.lint_kind, lint.problem_text) for lint in self.linter.lint(text, language="plaintext")]

    def score_one(self, text: str) -> float:
        if not text.strip():
            return 0.0
        return -self.per_words * len(self.errors(text)) / max(1, n_words(text))


def text_component(model_id: str, label: str, weight: float = 1.0, *, name: str | None = None):
    """The component for ``(model_id, label)`` in ``TEXT_SCORERS``, or ``None`` for a classifier id."""
    model_id = str(model_id)
    if model_id not in TEXT_SCORERS:
        return None
    if label not in TEXT_SCORERS[model_id]:
        raise ValueError(f"text scorer {model_id!r} has no label {label!r}; available: {TEXT_SCORERS[model_id]}")
    cls = VaderNeutral if model_id == "vader" else HarperGrammar
    return cls(weight, name)
