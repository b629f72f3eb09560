"""What changed in the *text*, not only in the reward: the word shift, and secondary metrics next to the reward.

Two parts, used by notebooks 01 and 05:

1. **Word shift** (``word_log_odds``): which words did RL make more or less frequent? Raw rate differences
   rank the most frequent words first (``the, of, to`` move by chance more than any rare word can), so we use
   the **log-odds ratio with an informative Dirichlet prior** of Monroe, Colaresi & Quinn 2008
   ("Fightin' Words"), with a z-score per word and a Bonferroni cut-off over the vocabulary. And we always
   show the **no-change baseline** (``no_change_baseline``): the same statistic between two random halves of
   one set of texts, where by construction nothing changed. A word shift is only news if it beats that.
2. **Secondary metrics** (``text_metrics``): length, distinct-n, repetition and a lexical relevance to the
   prompt. The original workshop found the reward up while grammar went down; a reward gain that comes with
   collapsing diversity ("on on on") or answers that ignore the question is reward hacking, not alignment.
"""
from __future__ import annotations

import math
import random
import re
from collections import Counter

import numpy as np
import pandas as pd
from scipy import stats

_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")

#: Function words ignored by the relevance metric (they match any prompt and say nothing about the topic).
STOP_WORDS = frozenset("""a an and are as at be been but by can could did do does for from had has have he her
his how i if in into is it its me my no not of on or our she so than that the their them then there these they
this to was we were what when where which who why will with would you your""".split())


def words(text: str) -> list[str]:
    """Lower-cased word tokens (letters and inner apostrophes: "it's" is one word; digits and punctuation dropped)."""
    return _WORD.findall(text.lower())


def _counts(texts) -> Counter:
    if isinstance(texts, str):
        raise TypeError("pass a list of texts, not a single string")
    return Counter(w for t in texts for w in words(t))


# --------------------------------------------------------------------------- 1. word shift
def word_log_odds(before_texts: list[str], after_texts: list[str], *, prior_texts: list[str] | None = None,
                  prior_strength: float = 500.0, alpha: float = 0.05) -> dict:
    """Which words became more (z > 0) or less (z < 0) frequent from ``before_texts`` to ``after_texts``.

    For word w with counts y_a (before) and y_b (after) out of n_a and n_b words, and prior pseudo-counts
    a_w = ``prior_strength`` x (w's share of the prior corpus) summing to a_0 (Monroe et al. 2008, eq. 16-22):

        delta_w = log((y_b + a_w) / (n_b + a_0 - y_b - a_w)) - log((y_a + a_w) / (n_a + a_0 - y_a - a_w))
        z_w     = delta_w / sqrt(1 / (y_b + a_w) + 1 / (y_a + a_w))

    The prior (by default both sets together) pulls rare words' log-odds towards zero, so a word seen once
    cannot top the list; the z-score divides by the uncertainty, so frequent words need a real change.
    ``prior_strength`` (a_0, in words) is how much the prior counts: 100-1000 is typical; larger shrinks more.
    A word is ``significant`` when |z| exceeds the two-sided ``alpha`` cut-off after Bonferroni correction
    over the V words tested (z_crit = Phi^-1(1 - alpha / 2V)): with thousands of words, plain |z| > 1.96
    would flag dozens by chance alone.

    Returns ``{"table": DataFrame, "z_crit", "n_before", "n_after", "vocabulary"}``; the table has one row
    per word (``word``, ``count_before``, ``count_after``, ``per_1000_before``, ``per_1000_after``,
    ``log_odds``, ``z``, ``significant``), sorted by |z|, largest first (ties alphabetically).
    """
    ca, cb = _counts(before_texts), _counts(after_texts)
    prior = _counts(prior_texts) if prior_texts is not None else ca + cb
    na, nb, n_prior = sum(ca.values()), sum(cb.values()), sum(prior.values())
    if na == 0 or nb == 0:
        raise ValueError(f"word_log_odds needs words on both sides, got {na} before and {nb} after")
    if prior_strength <= 0 or n_prior == 0:
        raise ValueError("word_log_odds needs prior_strength > 0 and a non-empty prior corpus")
    vocab = sorted(ca.keys() | cb.keys())
    tiny = prior_strength / (10.0 * n_prior)  # a word absent from a custom prior still gets a sliver of prior
    rows = []
    for w in vocab:
        a_w = max(prior_strength * prior[w] / n_prior, tiny)
        ya, yb = ca[w], cb[w]
        delta = (math.log((yb + a_w) / (nb + prior_strength - yb - a_w))
                 - math.log((ya + a_w) / (na + prior_strength - ya - a_w)))
        z = delta / math.sqrt(1.0 / (yb + a_w) + 1.0 / (ya + a_w))
        rows.append((w, ya, yb, 1000.0 * ya / na, 1000.0 * yb / nb, delta, z))
    z_crit = float(stats.norm.ppf(1.0 - alpha / (2.0 * max(1, len(vocab)))))
    table = pd.DataFrame(rows, columns=["word", "count_before", "count_after", "per_1000_before",
                                        "per_1000_after", "log_odds", "z"])
    table["significant"] = table["z"].abs() > z_crit
    table = (table.assign(_key=-table["z"].abs()).sort_values(["_key", "word"], kind="stable")
             .drop(columns="_key").reset_index(drop=True))
    return {"table": table, "z_crit": z_crit, "n_before": na, "n_after": nb, "vocabulary": len(vocab)}


def no_change_baseline(texts: list[str], *, seed: int = 0, **kwargs) -> dict:
    """``word_log_odds`` between two random halves of ``texts``: what a shift looks like when nothing changed.

    Returns that result plus ``max_abs_z`` and ``n_significant``. Compare the real shift's z-scores with
    ``max_abs_z``: words inside the baseline's range are indistinguishable from sampling noise.
    """
    if len(texts) < 2:
        raise ValueError(f"no_change_baseline needs at least 2 texts to split in halves, got {len(texts)}")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    half = len(order) // 2
    res = word_log_odds([texts[i] for i in order[:half]], [texts[i] for i in order[half:]], **kwargs)
    res["max_abs_z"] = float(res["table"]["z"].abs().max())
    res["n_significant"] = int(res["table"]["significant"].sum())
    return res


def replaced_words(before: list[str], after: list[str], shift: dict, k: int = 3, top: int = 10) -> list[dict]:
    """Up to ``k`` paired texts where a word that fell (one of the ``top`` most negative z) disappeared.

    The slide's "Trump *scrapped* ..." -> "Trump *announced* ...": for each text i, a fallen word present in
    ``before[i]`` and absent from ``after[i]``; ``added`` lists the risen words that appeared in its place.
    Texts with such a swap come first. Returns dicts ``{index, dropped, added, before, after}``.
    """
    if len(before) != len(after):
        raise ValueError(f"replaced_words pairs texts by position: {len(before)} before vs {len(after)} after")
    table = shift["table"]
    fell = list(table[table["z"] < 0].sort_values("z")["word"][:top])
    rose = set(table[table["z"] > 0].sort_values("z", ascending=False)["word"][:top])
    found = []
    for i, (b, a) in enumerate(zip(before, after)):
        wb, wa = set(words(b)), set(words(a))
        dropped = [w for w in fell if w in wb and w not in wa]
        if dropped:
            found.append({"index": i, "dropped": dropped, "added": sorted((wa - wb) & rose),
                          "before": b, "after": a})
    found.sort(key=lambda r: (not r["added"], r["index"]))
    return found[:k]


# --------------------------------------------------------------------------- 2. secondary metrics
def _ngrams(tokens: list[str], n: int) -> list[tuple]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct-n (Li et al. 2016): unique word n-grams / all word n-grams over the whole set, in [0, 1].

    Near 1: varied text; falling after RL: the policy found a few phrases the reward likes and repeats them
    across answers. 0.0 when the texts have no n-gram at all.
    """
    grams = [g for t in texts for g in _ngrams(words(t), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition(text: str, n: int = 3) -> float:
    """Share of a text's word n-grams that already occurred earlier *in the same text*, in [0, 1).

    "on on on on on" scores 2/3 at n = 3 (its 2nd and 3rd trigram repeat the 1st); normal prose scores ~0.
    """
    grams = _ngrams(words(text), n)
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


def relevance(prompt: str, response: str) -> float:
    """Lexical relevance: cosine similarity of the content-word counts of prompt and response, in [0, 1].

    A cheap, offline stand-in for the original's question-answer embedding similarity: it misses synonyms,
    but an answer that shares no content word with the question is rarely on topic. Stop words are ignored.
    """
    p = Counter(w for w in words(prompt) if w not in STOP_WORDS)
    r = Counter(w for w in words(response) if w not in STOP_WORDS)
    dot = sum(p[w] * r[w] for w in p.keys() & r.keys())
    norm = math.sqrt(sum(v * v for v in p.values())) * math.sqrt(sum(v * v for v in r.values()))
    return dot / norm if norm else 0.0


def text_metrics(texts: list[str], prompts: list[str] | None = None) -> dict:
    """Secondary metrics of a set of generated texts (one per prompt when ``prompts`` is given).

    ``mean_words`` (length), ``distinct_1``/``distinct_2`` (diversity across texts), ``repetition``
    (mean within-text trigram repetition), ``empty`` (share of empty texts) and, with prompts,
    ``relevance`` (mean lexical prompt-response similarity).
    """
    if not texts:
        raise ValueError("text_metrics needs at least one text")
    out = {"n": len(texts), "mean_words": float(np.mean([len(words(t)) for t in texts])),
           "distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2),
           "repetition": float(np.mean([repetition(t) for t in texts])),
           "empty": float(np.mean([not t.strip() for t in texts]))}
    if prompts is not None:
        if len(prompts) != len(texts):
            raise ValueError(f"text_metrics: {len(prompts)} prompts for {len(texts)} texts; give one per text")
        out["relevance"] = float(np.mean([relevance(p, t) for p, t in zip(prompts, texts)]))
    return out


def metrics_table(groups: dict, prompts: list[str] | None = None) -> pd.DataFrame:
    """One row of ``text_metrics`` per group, e.g. ``{"before": summaries, "after": summaries_rl}``."""
    return pd.DataFrame({name: text_metrics(t, prompts) for name, t in groups.items()}).T.astype({"n": int})
