"""Evaluate what RL changed (reward statistics) and what it did not (multiple-choice knowledge benchmarks).

Three parts, used by notebook 05:

1. **Statistics** for a before/after comparison of rewards on the same test prompts. Every number is
   computed here, never typed into a notebook. Convention everywhere: ``a`` = before, ``b`` = after, and a
   *difference* is ``after - before``, so a positive difference means RL raised the reward. ``verdict`` and
   ``describe_change`` weigh p, the interval and the effect size together (a tiny p with a hair of a shift is
   "statistically detectable but negligible"); ``length_bias_check`` asks whether the reward pays for length,
   leaving out answers the reward model only saw truncated.
2. **Batched generation** (``generate``): left padding for causal models, the prompt into the encoder for
   seq2seq models; returns only the new text, cut at the first stop token. ``answer_held_out`` samples each
   model's answers to the held-out prompts (several per prompt if asked) and scores them (``HeldOut``).
3. **Multiple-choice scoring** by log-likelihood, never by parsing free text, so no answer is ever
   "unparseable" (lm-evaluation-harness's protocol): ``score_choices_loglik`` scores each choice as a
   continuation of the question; ``score_letter_answer`` reproduces the original letter-answer prompt and
   compares the log-probabilities of " A", " B", ... Questions are any objects with ``question: str``,
   ``choices: list[str]`` and ``answer: int`` (``sawyer.data.MCQuestion``).
"""
from __future__ import annotations

import json
import string
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy import stats
from tqdm.auto import tqdm

from sawyer.ppo_models import sample_causal

# --------------------------------------------------------------------------- 1. statistics


def _array(values, name: str = "values") -> np.ndarray:
    x = np.asarray(values, dtype=float).ravel()
    if x.size == 0 or not np.all(np.isfinite(x)):
        raise ValueError(f"{name} must be a non-empty array of finite numbers (got {x.size} values, "
                         f"{int(np.sum(~np.isfinite(x)))} non-finite)")
    return x


def _paired(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = _array(a, "before"), _array(b, "after")
    if a.size != b.size:
        raise ValueError(f"paired comparison needs one before and one after value per prompt, got "
                         f"{a.size} before and {b.size} after values; use paired=False for independent samples")
    return a, b


def summarize(values) -> dict:
    """n, mean, median, std (sample std, ddof=1; NaN for one value), min and max of ``values``."""
    x = _array(values)
    return {"n": int(x.size), "mean": float(x.mean()), "median": float(np.median(x)),
            "std": float(x.std(ddof=1)) if x.size > 1 else float("nan"),
            "min": float(x.min()), "max": float(x.max())}


def summary_table(groups: dict) -> pd.DataFrame:
    """One row of ``summarize`` per group, e.g. ``{"SFT": rewards_sft, "RL": rewards_rl}``."""
    return pd.DataFrame({name: summarize(v) for name, v in groups.items()}).T.astype({"n": int})


def mann_whitney(a, b) -> dict:
    """Two-sided Mann-Whitney U test: do independent samples ``a`` and ``b`` come from shifted distributions?

    ``U`` is scipy's statistic for ``a`` (the number of (a, b) pairs with a > b, ties counting 1/2).
    It ignores the pairing, so on paired data it is the weaker test (the original reported p = 0.0073).
    """
    res = stats.mannwhitneyu(_array(a, "before"), _array(b, "after"), alternative="two-sided")
    return {"U": float(res.statistic), "p": float(res.pvalue)}


def wilcoxon_paired(a, b) -> dict:
    """Two-sided Wilcoxon signed-rank test on the paired differences ``b - a`` (one pair per prompt).

    Uses the pairing, so it sees a consistent shift that the spread of rewards across prompts hides
    (the original: p = 2.2e-5 where Mann-Whitney gave 0.0073). Zero differences are dropped (scipy's
    "wilcox" rule); when every difference is zero there is no evidence of change: W = 0, p = 1.
    """
    a, b = _paired(a, b)
    d = b - a
    if not np.any(d):
        return {"W": 0.0, "p": 1.0}
    res = stats.wilcoxon(d, alternative="two-sided")
    return {"W": float(res.statistic), "p": float(res.pvalue)}


def bootstrap_mean_diff_ci(a, b, *, paired: bool = True, n_resamples: int = 10000, confidence: float = 0.95,
                           seed: int = 0) -> dict:
    """``mean(b) - mean(a)`` and its percentile bootstrap confidence interval (Efron & Tibshirani 1993).

    Paired: resample prompts, keeping each prompt's (before, after) together, i.e. resample the differences.
    Unpaired: resample ``a`` and ``b`` independently. The CI is the (alpha/2, 1 - alpha/2) quantiles of the
    resampled differences; 10,000 resamples put the Monte Carlo error of the ends well below 1% of the width.
    """
    if paired:
        a, b = _paired(a, b)
    else:
        a, b = _array(a, "before"), _array(b, "after")
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // max(a.size, b.size))  # resamples per chunk, bounding memory
    diffs = []
    for start in range(0, n_resamples, chunk):
        m = min(chunk, n_resamples - start)
        if paired:
            idx = rng.integers(0, a.size, size=(m, a.size))  # (m, n): m resamples of prompt indices
            diffs.append((b - a)[idx].mean(axis=1))
        else:
            ia, ib = rng.integers(0, a.size, size=(m, a.size)), rng.integers(0, b.size, size=(m, b.size))
            diffs.append(b[ib].mean(axis=1) - a[ia].mean(axis=1))
    alpha = 1.0 - confidence
    lo, hi = np.quantile(np.concatenate(diffs), [alpha / 2, 1 - alpha / 2])
    return {"diff": float(b.mean() - a.mean()), "ci_low": float(lo), "ci_high": float(hi),
            "confidence": confidence, "n_resamples": n_resamples, "paired": paired}


def effect_size(a, b, paired: bool = True) -> dict:
    """How big the change is, in units of spread (p-values only say whether it is there).

    ``cohens_d``: paired, Cohen's d_z = mean(b - a) / std(b - a); unpaired, (mean(b) - mean(a)) / pooled sd.
    Rough reading: 0.2 small, 0.5 medium, 0.8 large. Beware d_z on paired data: when every prompt moves by
    the same tiny amount, std(b - a) is tiny too and d_z is huge for a change nobody would notice.
    ``d_av`` = mean(b - a) / sqrt((var(a) + var(b)) / 2) measures the shift against the spread of the rewards
    themselves across prompts (Cumming 2012's d_av), which is what "is this a big change?" means; the verdict
    of ``describe_change`` uses it. ``rank_biserial`` = 1 - 2U/(n_a n_b) from Mann-Whitney's U:
    P(after > before) - P(after < before) for a random pair, in [-1, 1], robust to outliers.
    """
    if paired:
        a, b = _paired(a, b)
        d = b - a
        sd = d.std(ddof=1) if d.size > 1 else float("nan")
        cohen = d.mean() / sd if sd > 0 else float("nan")
    else:
        a, b = _array(a, "before"), _array(b, "after")
        dof = a.size + b.size - 2
        pooled = np.sqrt(((a.size - 1) * a.var(ddof=1) + (b.size - 1) * b.var(ddof=1)) / dof) if dof > 0 else 0
        cohen = (b.mean() - a.mean()) / pooled if pooled > 0 else float("nan")
    spread = np.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2) if min(a.size, b.size) > 1 else 0.0
    diff = b.mean() - a.mean()
    d_av = diff / spread if spread > 0 else (0.0 if diff == 0 else float("inf") * np.sign(diff))
    u = mann_whitney(a, b)["U"]
    return {"cohens_d": float(cohen), "d_av": float(d_av), "rank_biserial": float(1.0 - 2.0 * u / (a.size * b.size)),
            "kind": "d_z (paired)" if paired else "d (pooled sd)"}


def compare(before, after, paired: bool = True, *, n_resamples: int = 10000, confidence: float = 0.95,
            seed: int = 0) -> dict:
    """Everything for one before/after comparison: summaries, tests, bootstrap CI and effect sizes.

    The main test is Wilcoxon when ``paired`` (same prompts scored twice), else Mann-Whitney; both are reported.
    """
    out = {"paired": paired, "before": summarize(before), "after": summarize(after),
           "mann_whitney": mann_whitney(before, after),
           "bootstrap": bootstrap_mean_diff_ci(before, after, paired=paired, n_resamples=n_resamples,
                                               confidence=confidence, seed=seed),
           "effect_size": effect_size(before, after, paired=paired)}
    if paired:
        out["wilcoxon"] = wilcoxon_paired(before, after)
    return out


#: |d_av| below which a change is "negligible", and the small / medium / large cut-offs (Cohen 1988).
NEGLIGIBLE, MEDIUM, LARGE = 0.2, 0.5, 0.8


def verdict(result: dict, alpha: float = 0.05, negligible: float = NEGLIGIBLE, min_effect: float | None = None,
            rel_level: float = 0.01) -> dict:
    """Weigh the p-value, the interval and the effect size into one verdict (``label`` plus a ``reason``).

    - p >= ``alpha``: **"no detectable change"** (the interval says how large a change the data cannot rule out);
    - p < ``alpha`` but the shift is under ``negligible`` of the rewards' spread across prompts (|d_av|), or
      under ``rel_level`` (1%) of the metric's own level max(|mean before|, |mean after|) (a metric that barely
      varies across prompts, e.g. a near-constant classifier, has a tiny spread that makes any hair look
      "large"), or the whole interval lies inside +-``min_effect`` (a smallest change that matters, in the
      metric's own units, when you have one): **"statistically detectable but negligible"**. With many
      prompts, or a policy that moves every answer by the same hair, a tiny p comes with a shift nobody notices;
    - otherwise **"a small / medium / large shift"** by |d_av| (0.2 / 0.5 / 0.8), up or down.
    """
    test, p = _main_test(result)
    boot, d_av = result["bootstrap"], result["effect_size"]["d_av"]
    inside = min_effect is not None and -min_effect < boot["ci_low"] and boot["ci_high"] < min_effect
    level = max(abs(result["before"]["mean"]), abs(result["after"]["mean"]))
    hair = abs(boot["diff"]) < rel_level * level
    direction = "up" if boot["diff"] > 0 else "down"
    if p >= alpha:
        label, reason = "no detectable change", f"{test} p = {p:.2g} >= {alpha:g}"
    elif abs(d_av) < negligible or inside or hair:
        label = "statistically detectable but negligible"
        reason = (f"{test} p = {p:.2g}, but the whole interval lies within +-{min_effect:g}" if inside else
                  f"{test} p = {p:.2g}, but the shift is {abs(d_av):.2f} of the spread across prompts (|d_av| < "
                  f"{negligible:g})" if abs(d_av) < negligible else
                  f"{test} p = {p:.2g}, but the shift is {100 * abs(boot['diff']) / level:.2g}% of the mean's size")
    else:
        size = "large" if abs(d_av) >= LARGE else "medium" if abs(d_av) >= MEDIUM else "small"
        label, reason = f"a {size} shift {direction}", f"{test} p = {p:.2g}, d_av = {d_av:+.2f}"
    return {"label": label, "reason": reason, "p": p, "test": test, "d_av": d_av}


def _main_test(result: dict) -> tuple[str, float]:
    if result.get("paired") and "wilcoxon" in result:
        return "Wilcoxon", result["wilcoxon"]["p"]
    return "Mann-Whitney", result["mann_whitney"]["p"]


def _num(x: float, scale: float) -> str:
    """``x`` with enough decimals to be non-zero at the size of ``scale`` (2 decimals, more for tiny shifts)."""
    decimals = 2 if scale == 0 or abs(scale) >= 0.005 else min(8, 1 - int(np.floor(np.log10(abs(scale)))))
    return f"{x:.{decimals}f}"


def describe_change(name: str, result: dict, alpha: float = 0.05, negligible: float = NEGLIGIBLE,
                    min_effect: float | None = None, rel_level: float = 0.01) -> str:
    """One plain-English sentence generated from ``compare``'s numbers and ``verdict``, e.g.

    "Mean reward rose from 5.70 to 6.92 (+1.22, 95% CI [0.80, 1.60]); Wilcoxon p = 2.2e-05, d_av = +0.43:
    a small shift up."  A shift too small for 2 decimals is printed with more ("+0.0031, CI [0.0012, 0.0050]").
    """
    before, after, boot = result["before"]["mean"], result["after"]["mean"], result["bootstrap"]
    diff = boot["diff"]
    verb = "rose" if diff > 0 else "fell" if diff < 0 else "stayed"
    scale = max(abs(diff), abs(boot["ci_high"] - boot["ci_low"]) / 2)
    v = verdict(result, alpha, negligible, min_effect, rel_level)
    fmt = (lambda x: _num(x, scale))  # noqa: E731
    return (f"Mean {name} {verb} from {fmt(before)} to {fmt(after)} ({'+' if diff >= 0 else '-'}{fmt(abs(diff))}, "
            f"{boot['confidence']:.0%} CI [{fmt(boot['ci_low'])}, {fmt(boot['ci_high'])}]); "
            f"{v['reason']}: {v['label']}.")


def proportion_ci(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for an accuracy of ``k`` correct out of ``n`` (Wilson 1927).

    Unlike the textbook p +- z sqrt(p(1-p)/n) it stays inside [0, 1] and behaves at 0% and 100%. With the
    171 world-religions questions a 95% interval is about +-6 points: read small benchmark gaps with care.
    """
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"proportion_ci needs 0 <= k <= n and n > 0, got k={k}, n={n}")
    z = stats.norm.ppf(0.5 + confidence / 2)
    p, z2 = k / n, z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return float(max(0.0, center - half)), float(min(1.0, center + half))


def truncated_mask(tokenizer, questions: list[str], answers: list[str], max_length: int) -> list[bool]:
    """True for each (question, answer) whose cross-encoder encoding is longer than ``max_length`` tokens.

    Such an answer is scored on a cut-off text (``sawyer.reward`` truncates the answer, never the question),
    so its reward says nothing about its full length: a length-bias check must mark or drop it.
    """
    if len(questions) != len(answers):
        raise ValueError(f"truncated_mask: {len(questions)} questions for {len(answers)} answers")
    enc = tokenizer(list(questions), list(answers), truncation=False, verbose=False)  # verbose: no length warning
    return [len(ids) > max_length for ids in enc["input_ids"]]


def length_bias_check(rewards, lengths, truncated=None, confidence: float = 0.95, unit: str = "words") -> dict:
    """Does the reward grow with answer length? Spearman's rho with its confidence interval, truncated answers out.

    ``truncated`` (one bool per answer, from ``truncated_mask``) marks answers the reward model saw cut off;
    they are dropped from ``spearman_rho`` (``rho_with_truncated`` keeps them, for comparison): a cut answer
    scores like a shorter one, which hides a length preference. The interval is Fisher's z with the
    Bonett & Wright (2000) standard error sqrt((1 + rho^2 / 2) / (n - 3)). ``verdict`` reads rho >= 0.3 as
    a real length preference and says so when the interval cannot rule one out. Length in ``unit``.
    """
    r, n = _array(rewards, "rewards"), _array(lengths, "lengths")
    cut = np.zeros(r.size, bool) if truncated is None else np.asarray(truncated, dtype=bool).ravel()
    if not r.size == n.size == cut.size:
        raise ValueError(f"length_bias_check: {r.size} rewards, {n.size} lengths, {cut.size} truncation flags")
    keep = ~cut
    if keep.sum() < 4:
        raise ValueError(f"length_bias_check needs >= 4 untruncated answers, got {int(keep.sum())} of {r.size}")
    res = stats.spearmanr(n[keep], r[keep])
    rho, p, k = float(res.statistic), float(res.pvalue), int(keep.sum())
    half = stats.norm.ppf(0.5 + confidence / 2) * np.sqrt((1 + rho ** 2 / 2) / max(1, k - 3))
    lo, hi = (float(np.tanh(np.arctanh(np.clip(rho, -0.999999, 0.999999)) + s * half)) for s in (-1, 1))
    ci = f"rho = {rho:.2f}, {confidence:.0%} CI [{lo:.2f}, {hi:.2f}], on {k} answers"
    if p < 0.05 and rho >= 0.3:
        verdict = f"the reward model pays for length ({ci}): expect PPO to lengthen answers"
    elif p < 0.05 and rho > 0:
        verdict = f"a weak but real preference for longer answers ({ci})"
    elif hi >= 0.3:
        verdict = f"no clear length preference, but the interval cannot rule out a moderate one ({ci})"
    else:
        verdict = f"no length preference ({ci})"
    return {"n": k, "n_truncated": int(cut.sum()), "spearman_rho": rho, "ci_low": lo, "ci_high": hi,
            "spearman_p": p, "rho_with_truncated": float(stats.spearmanr(n, r).statistic),
            "confidence": confidence, "unit": unit, "verdict": verdict}


#: The banner every notebook shows on the ``tiny`` preset (``banner``).
TINY_BANNER = (
    "> **`tiny` preset: the text below is meaningless.** The models are tiny stand-ins of the real architectures,"
    " built offline and trained for seconds: they write word salad, and every number only shows that the code"
    " path works end to end. Watch the *mechanics* (a reward that rises, a KL that grows, a policy that learns to"
    " please a weak reward with degenerate text: that is reward hacking, the lesson of this course in miniature)."
    " For real text, run the `t4` preset on a GPU.")


def banner(preset: str) -> str:
    """``TINY_BANNER`` for the tiny preset (display it as Markdown), else an empty string."""
    return TINY_BANNER if preset == "tiny" else ""


# --------------------------------------------------------------------------- 2. generation


def _is_seq2seq(model) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))  # PeftModel forwards .config


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no pad token; load it with "
                         "sawyer.loading.load_tokenizer, which uses EOS as pad (masked by attention)")
    return tokenizer.pad_token_id


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int = 8,
             do_sample: bool = False, temperature: float = 1.0, stop_token_ids=None, seed: int = 0,
             progress: bool = True) -> list[str]:
    """Generate a response per prompt in batches; return only the new text, in the prompts' order.

    Causal models get *left* padding so every prompt ends at the same position and the new tokens follow
    directly (right padding would put pad tokens between prompt and answer). Seq2seq models read the prompt
    in the encoder and write the answer from the decoder start token. Prompts are batched in length order
    to waste little compute on padding. ``do_sample=False`` is greedy; sampling is plain temperature
    sampling (no top-k/top-p), for causal models drawn by ``ppo_models.sample_causal`` (the distribution
    ``generate`` samples, faster on a CPU). Each text is cut at the first EOS or ``stop_token_ids`` token
    (e.g. ``###STOP###``) and decoded without special tokens. Works for ``PeftModel`` too.
    """
    seq2seq, pad_id = _is_seq2seq(model), _pad_id(tokenizer)
    model_eos = model.generation_config.eos_token_id  # an int or a list (Llama-3 chat models have two)
    model_eos = model_eos if isinstance(model_eos, list) else [model_eos]
    stop = [int(s) for s in dict.fromkeys([tokenizer.eos_token_id, *model_eos, *(stop_token_ids or [])])
            if s is not None]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, eos_token_id=stop, pad_token_id=pad_id)
    if do_sample:
        gen_kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
    torch.manual_seed(seed)
    side, tokenizer.padding_side = tokenizer.padding_side, "right" if seq2seq else "left"
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="generate", disable=not progress):
            idx = order[start:start + batch_size]
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True).to(_device(model))
            if do_sample and not seq2seq:  # generate's distribution, drawn by PPO's faster loop
                new = sample_causal(model, enc["input_ids"], enc["attention_mask"], temperature=temperature,
                                    min_new_tokens=0, max_new_tokens=max_new_tokens, stop_token_ids=tuple(stop),
                                    pad_token_id=pad_id)                       # (B, T_new)
            else:
                seqs = model.generate(**enc, **gen_kwargs)  # (B, T_prompt + T_new) causal, (B, 1 + T_new) seq2seq
                new = seqs[:, 1:] if seq2seq else seqs[:, enc["input_ids"].shape[1]:]  # (B, T_new)
            for i, row in zip(idx, new.tolist()):
                cut = next((j for j, t in enumerate(row) if t in stop), len(row))
                out[i] = tokenizer.decode(row[:cut], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out


@dataclass
class HeldOut:
    """Every model's sampled answers to the held-out prompts, and the reward model's score of each.

    ``samples`` answers per prompt, stored flat in prompt order (prompt 0's samples first):
    ``all_answers[name]``, ``all_rewards[name]`` (an array), ``all_lengths[name]`` (words), with
    ``prompt_ids[j]`` the prompt of flat entry ``j``. Per prompt (what the paired tests compare, as a prompt is
    the unit that both models answered): ``rewards[name]`` is the mean reward of its samples, ``lengths[name]``
    their mean length, ``answers[name]`` the first sample (for tables).
    """

    samples: int
    prompt_ids: list[int]
    all_answers: dict[str, list[str]]
    all_rewards: dict[str, np.ndarray]
    all_lengths: dict[str, list[int]]

    def _per_prompt(self, values) -> np.ndarray:
        return np.asarray(values, dtype=float).reshape(-1, self.samples).mean(1)

    @property
    def rewards(self) -> dict[str, np.ndarray]:
        return {name: self._per_prompt(r) for name, r in self.all_rewards.items()}

    @property
    def lengths(self) -> dict[str, list[float]]:
        return {name: self._per_prompt(n).tolist() for name, n in self.all_lengths.items()}

    @property
    def answers(self) -> dict[str, list[str]]:
        return {name: a[::self.samples] for name, a in self.all_answers.items()}

    def write_jsonl(self, path) -> None:
        """One row per answer: ``{"prompt_id", "sample", "model", "reward", "length"}`` (``sawyer.plots`` reads it)."""
        with open(path, "w", encoding="utf-8") as f:
            for name, rewards in self.all_rewards.items():
                for j, (r, n) in enumerate(zip(rewards, self.all_lengths[name])):
                    f.write(json.dumps({"prompt_id": self.prompt_ids[j], "sample": j % self.samples, "model": name,
                                        "reward": float(r), "length": n}) + "\n")


def answer_held_out(model, tokenizer, prompts: list[str], reward_fn, use, models, *, samples: int = 1,
                    max_new_tokens: int, batch_size: int = 8, temperature: float = 0.7, stop_token_ids=None,
                    extract=lambda a: a, seed: int = 0, progress: bool = True) -> HeldOut:
    """Sample ``samples`` answers per prompt from each of ``models`` and score them all with ``reward_fn``.

    ``use(name)`` is a context manager that makes ``model`` act as that model (an adapter switch). Every model
    samples from the same seed, at ``temperature``, so a run reproduces. ``extract`` turns a generated text into
    the reply that is scored (e.g. ``chat.extract_reply``).

    Why several samples: one sampled answer per prompt makes each prompt's reward a coin flip when the reward
    model is confident (scores near +/- its extremes), and that noise, not the models, decides a paired test
    on a few dozen prompts. The mean of ``samples`` answers estimates each model's *expected* reward on the
    prompt; the paired test then compares those means, prompt by prompt.
    """
    if samples < 1:
        raise ValueError(f"samples={samples!r}: need at least one answer per prompt")
    repeated = [p for p in prompts for _ in range(samples)]
    prompt_ids = [i for i in range(len(prompts)) for _ in range(samples)]
    all_answers, all_rewards = {}, {}
    for name in models:
        with use(name):
            texts = generate(model, tokenizer, repeated, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             do_sample=True, temperature=temperature, stop_token_ids=stop_token_ids, seed=seed,
                             progress=progress)
        all_answers[name] = [extract(t) for t in texts]
        all_rewards[name] = np.asarray(reward_fn(repeated, all_answers[name]), dtype=float)
    lengths = {name: [len(a.split()) for a in answers] for name, answers in all_answers.items()}
    return HeldOut(samples, prompt_ids, all_answers, all_rewards, lengths)


# --------------------------------------------------------------------------- 3. multiple choice

#: Prompt templates for the log-likelihood protocol; each choice is scored as the continuation " {choice}".
PROMPTS = {"chat": "###HUMAN### {question} ###BOT###", "plain": "Question: {question}\nAnswer:"}
#: Letter-answer templates (the original workshop's protocol); ``{choices}`` renders as "A. ...\nB. ...".
LETTER_PROMPTS = {
    "chat": "###HUMAN### {question}\n{choices}\nAnswer with the letter of the correct choice. ###BOT###",
    "plain": "Question: {question}\n{choices}\nAnswer with the letter of the correct choice.\nAnswer:"}


@torch.no_grad()
def _continuation_logprobs(model, pairs: list[tuple[list[int], list[int]]], pad_id: int):
    """Score token-id pairs (prompt, continuation) in one right-padded forward pass.

    Returns ``token_lp`` (B, L) = log p(continuation token | everything before), zero past each continuation,
    and ``next_lp`` (B, V) = the next-token distribution right after each continuation.
    Causal: the sequence is prompt + continuation and row t of the logits predicts token t + 1, so the rows
    that matter start at len(prompt) - 1. Seq2seq: the prompt goes to the encoder, the decoder reads
    [start] + continuation, and its rows predict the continuation from row 0.
    """
    dev, seq2seq = _device(model), _is_seq2seq(model)
    B, L = len(pairs), max(len(c) for _, c in pairs) + 1  # L rows per pair: one per token + the next token

    def pad(rows):  # right padding: real tokens keep their positions, so no position-id care is needed
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r, dtype=torch.long), 1
        return ids.to(dev), mask.to(dev)

    if seq2seq:
        enc, enc_mask = pad([p for p, _ in pairs])
        dec, dec_mask = pad([[model.config.decoder_start_token_id, *c] for _, c in pairs])
        logits = model(input_ids=enc, attention_mask=enc_mask, decoder_input_ids=dec,
                       decoder_attention_mask=dec_mask).logits  # (B, 1 + Lc, V)
        first = torch.zeros(B, dtype=torch.long, device=dev)
    else:
        ids, mask = pad([p + c for p, c in pairs])
        logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
        first = torch.tensor([len(p) - 1 for p, _ in pairs], device=dev)
    pos = (first[:, None] + torch.arange(L, device=dev)[None]).clamp(max=logits.shape[1] - 1)  # (B, L)
    rows = logits.gather(1, pos[..., None].expand(-1, -1, logits.shape[-1])).float().log_softmax(-1)  # (B, L, V)
    target, valid = pad([c for _, c in pairs])  # (B, Lc)
    token_lp = rows[:, :-1].gather(-1, target[..., None]).squeeze(-1)  # (B, Lc)
    token_lp = torch.where(valid.bool(), token_lp, torch.zeros_like(token_lp))
    n_cont = torch.tensor([len(c) for _, c in pairs], device=dev)
    next_lp = rows[torch.arange(B, device=dev), n_cont]  # (B, V)
    return token_lp, next_lp


def _result(label: str, protocol: str, questions, scores: list[list[float]], confidence: float) -> dict:
    preds = [int(np.argmax(s)) for s in scores]
    answers = [int(q.answer) for q in questions]
    k = sum(p == a for p, a in zip(preds, answers))
    lo, hi = proportion_ci(k, len(answers), confidence)
    return {"label": label, "protocol": protocol, "accuracy": k / len(answers), "n": len(answers),
            "correct": k, "ci_low": lo, "ci_high": hi, "predictions": preds, "answers": answers, "scores": scores}


def _check(questions) -> None:
    if not questions:
        raise ValueError("no questions to score")
    for i, q in enumerate(questions):
        if not 0 <= q.answer < len(q.choices):
            raise ValueError(f"question {i} ({q.question[:60]!r}): answer {q.answer} is not an index into "
                             f"its {len(q.choices)} choices")


def score_choices_loglik(model, tokenizer, questions, *, prompt_template: str = "chat", batch_size: int = 8,
                         normalize: str = "mean", label: str | None = None, confidence: float = 0.95,
                         progress: bool = True) -> dict:
    """Multiple choice by log-likelihood: predict the choice the model finds most probable after the question.

    Each choice is the continuation ``" " + choice`` of ``prompt_template`` (``"chat"``: the SAWYER template,
    ``"plain"``: "Question: ...\\nAnswer:", or any string with ``{question}``). Prompt and continuation are
    tokenised *separately* and their ids concatenated, so the boundary is exact and only continuation
    tokens are scored. ``normalize="mean"`` averages log-probs per token (long choices are not penalised
    for their length); ``"sum"`` is the joint log-probability. All (question, choice) pairs run in batches.

    Returns accuracy, n, correct, the Wilson CI (ci_low, ci_high), per-question predictions, answers and
    scores, plus ``label`` (for plots) and ``protocol``.
    """
    if normalize not in ("mean", "sum"):
        raise ValueError(f"normalize must be 'mean' or 'sum', got {normalize!r}")
    _check(questions)
    template = PROMPTS.get(prompt_template, prompt_template)
    pairs, owner = [], []  # owner[j] = (question index, choice index) of pair j
    for i, q in enumerate(questions):
        prompt = tokenizer(template.format(question=q.question))["input_ids"]
        for c, choice in enumerate(q.choices):
            cont = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
            if not cont or not prompt:
                raise ValueError(f"question {i} choice {c} ({choice!r}): empty prompt or continuation tokens")
            pairs.append((prompt, cont))
            owner.append((i, c))
    scores = [[0.0] * len(q.choices) for q in questions]
    for start in tqdm(range(0, len(pairs), batch_size), desc=label or "loglik", disable=not progress):
        chunk = pairs[start:start + batch_size]
        token_lp, _ = _continuation_logprobs(model, chunk, _pad_id(tokenizer))
        for j, lp in enumerate(token_lp.sum(-1).tolist()):
            i, c = owner[start + j]
            scores[i][c] = lp / len(chunk[j][1]) if normalize == "mean" else lp
    return _result(label or f"loglik-{normalize}", "loglik", questions, scores, confidence)


def score_letter_answer(model, tokenizer, questions, *, template: str = "chat", batch_size: int = 8,
                        label: str | None = None, confidence: float = 0.95, progress: bool = True) -> dict:
    """Multiple choice the original workshop's way: list the choices as A., B., ... and ask for the letter.

    Instead of parsing the model's free text, compare log p(" A" | prompt), log p(" B" | prompt), ... and
    take the argmax over the letters. When the letters tokenise as a shared prefix plus one distinct token
    each (" A" = " " + "A" in byte-level BPE), one forward pass per question gives every letter's score;
    otherwise each letter is scored as its own continuation (same numbers, more passes).
    Returns the same keys as ``score_choices_loglik``.
    """
    _check(questions)
    template = LETTER_PROMPTS.get(template, template)
    fast, slow = [], []  # fast: (question, prompt, prefix, letter ids); slow: (question, choice, pair)
    for i, q in enumerate(questions):
        letters = string.ascii_uppercase[:len(q.choices)]
        listed = "\n".join(f"{L}. {c}" for L, c in zip(letters, q.choices))
        prompt = tokenizer(template.format(question=q.question, choices=listed))["input_ids"]
        ids = [tokenizer(" " + L, add_special_tokens=False)["input_ids"] for L in letters]
        n = 0  # length of the prefix every letter shares
        while all(len(t) > n + 1 for t in ids) and len({t[n] for t in ids}) == 1:
            n += 1
        last = [t[n] for t in ids]
        if all(len(t) == n + 1 for t in ids) and len(set(last)) == len(last):
            fast.append((i, prompt, ids[0][:n], last))
        else:
            slow.extend((i, c, (prompt, t)) for c, t in enumerate(ids))
    scores = [[0.0] * len(q.choices) for q in questions]
    bar = tqdm(total=len(fast) + len(slow), desc=label or "letter", disable=not progress)
    for start in range(0, len(fast), batch_size):
        chunk = fast[start:start + batch_size]
        token_lp, next_lp = _continuation_logprobs(model, [(p, pre) for _, p, pre, _ in chunk], _pad_id(tokenizer))
        for j, (i, _, _, last) in enumerate(chunk):
            scores[i] = (token_lp[j].sum() + next_lp[j, last]).tolist()  # log p(prefix) + log p(letter)
        bar.update(len(chunk))
    for start in range(0, len(slow), batch_size):
        chunk = slow[start:start + batch_size]
        token_lp, _ = _continuation_logprobs(model, [pair for _, _, pair in chunk], _pad_id(tokenizer))
        for (i, c, _), lp in zip(chunk, token_lp.sum(-1).tolist()):
            scores[i][c] = lp
        bar.update(len(chunk))
    bar.close()
    return _result(label or "letter", "letter", questions, scores, confidence)
