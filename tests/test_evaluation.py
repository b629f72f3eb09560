"""Tests for sawyer.evaluation: statistics against scipy and hand-computed values, generation, MC scorers."""
import math
import random
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from scipy import stats

from sawyer import evaluation as ev

# 40 prompts scored before and after (literal data: seeded normal draws, rounded)
BEFORE = [6.91, 8.58, 6.86, 1.14, 8.87, 7.26, 3.82, 7.73, 6.98, 6.73, 5.8, 7.61, 3.12, 5.13, 4.01, 7.8, 5.84,
          4.68, 2.96, 4.8, 5.73, 4.74, 10.23, 9.22, -3.79, -0.91, 5.09, 4.22, 6.45, 6.46, 13.11, 1.81, 4.38,
          12.85, 7.96, 8.02, 3.9, -0.07, 6.29, 6.08]
AFTER = [5.66, 8.41, 7.92, 0.45, 9.87, 8.65, 5.09, 7.92, 9.37, 9.71, 7.64, 7.17, 5.78, 5.33, 6.97, 6.86, 8.87,
         5.84, 1.66, 5.37, 7.04, 6.49, 9.47, 8.21, -2.19, -0.64, 6.76, 6.94, 4.35, 8.17, 16.76, 2.41, 3.96,
         15.55, 9.67, 11.01, 4.41, -1.83, 7.27, 6.39]


# --------------------------------------------------------------------------- statistics
def test_summarize_hand_values_and_scipy():
    s = ev.summarize([1, 2, 3, 4])
    assert s["n"] == 4 and s["mean"] == 2.5 and s["median"] == 2.5 and s["min"] == 1 and s["max"] == 4
    assert s["std"] == pytest.approx(math.sqrt(5 / 3))  # ddof=1: sum of squares 5 over n - 1 = 3
    d, s = stats.describe(AFTER), ev.summarize(AFTER)
    assert s["mean"] == pytest.approx(d.mean) and s["std"] == pytest.approx(math.sqrt(d.variance))
    assert (s["min"], s["max"]) == d.minmax and s["median"] == pytest.approx(np.median(AFTER))
    assert math.isnan(ev.summarize([3.0])["std"])
    with pytest.raises(ValueError, match="non-finite"):
        ev.summarize([1.0, float("nan")])


def test_summary_table_rows_equal_summarize():
    table = ev.summary_table({"SFT": BEFORE, "RL": AFTER})
    assert list(table.index) == ["SFT", "RL"]
    assert list(table.columns) == ["n", "mean", "median", "std", "min", "max"]
    assert table.loc["RL", "mean"] == pytest.approx(ev.summarize(AFTER)["mean"]) and table.loc["SFT", "n"] == 40


def test_mann_whitney_matches_scipy_and_hand_value():
    ref = stats.mannwhitneyu(BEFORE, AFTER, alternative="two-sided")
    res = ev.mann_whitney(BEFORE, AFTER)
    assert res["U"] == pytest.approx(ref.statistic) and res["p"] == pytest.approx(ref.pvalue)
    # no before value beats any after value: U = 0; exact two-sided p = 2 / C(6, 3) = 0.1
    assert ev.mann_whitney([1, 2, 3], [4, 5, 6]) == pytest.approx({"U": 0.0, "p": 0.1})


def test_wilcoxon_matches_scipy_and_hand_value():
    ref = stats.wilcoxon(np.subtract(AFTER, BEFORE), alternative="two-sided")
    res = ev.wilcoxon_paired(BEFORE, AFTER)
    assert res["W"] == pytest.approx(ref.statistic) and res["p"] == pytest.approx(ref.pvalue)
    # five distinct positive differences: W = min(R+, R-) = 0, exact p = 2 * (1/2)**5 = 0.0625
    assert ev.wilcoxon_paired([1, 2, 3, 4, 5], [2.1, 3.3, 4.6, 6.2, 7.0]) == pytest.approx({"W": 0.0, "p": 0.0625})
    assert ev.wilcoxon_paired([1, 2], [1, 2]) == {"W": 0.0, "p": 1.0}
    with pytest.raises(ValueError, match="3 before and 2 after"):
        ev.wilcoxon_paired([1, 2, 3], [1, 2])


@pytest.mark.parametrize("paired", [True, False])
def test_bootstrap_ci_agrees_with_scipy(paired):
    a, b = np.array(BEFORE), np.array(AFTER)
    res = ev.bootstrap_mean_diff_ci(a, b, paired=paired, n_resamples=10000, seed=0)
    if paired:
        ref = stats.bootstrap((a, b), lambda x, y, axis: np.mean(y - x, axis=axis), paired=True,
                              method="percentile", n_resamples=10000, random_state=1)
    else:
        ref = stats.bootstrap((a, b), lambda x, y, axis: np.mean(y, axis=axis) - np.mean(x, axis=axis),
                              paired=False, method="percentile", n_resamples=10000, random_state=1)
    lo, hi = ref.confidence_interval
    width = hi - lo
    assert res["diff"] == pytest.approx(b.mean() - a.mean())
    assert abs(res["ci_low"] - lo) < 0.05 * width and abs(res["ci_high"] - hi) < 0.05 * width
    assert res["ci_low"] < res["diff"] < res["ci_high"]
    assert ev.bootstrap_mean_diff_ci(a, b, paired=paired, seed=0) == res  # seeded: reproducible


def test_paired_bootstrap_is_narrower_than_unpaired():
    # pairing removes the prompt-to-prompt spread, which dominates these rewards
    p = ev.bootstrap_mean_diff_ci(BEFORE, AFTER, paired=True)
    u = ev.bootstrap_mean_diff_ci(BEFORE, AFTER, paired=False)
    assert p["ci_high"] - p["ci_low"] < 0.5 * (u["ci_high"] - u["ci_low"])


def test_effect_sizes_hand_computed():
    a, b = [1, 2, 3, 4], [2, 4, 5, 5]
    # paired: differences 1, 2, 2, 1 -> mean 1.5, sd sqrt(1/3): d_z = 1.5 / 0.57735 = 2.598076
    assert ev.effect_size(a, b, paired=True)["cohens_d"] == pytest.approx(2.598076, abs=1e-6)
    # unpaired: var(a) = 5/3, var(b) = 2 -> pooled sd sqrt((5 + 6) / 6) = 1.354006; d = 1.5 / 1.354006
    res = ev.effect_size(a, b, paired=False)
    assert res["cohens_d"] == pytest.approx(1.107823, abs=1e-6)
    # U(a) = 0 + 0.5 + 1 + 1.5 = 3 (pairs a > b, ties 1/2): rank-biserial = 1 - 2 * 3 / 16 = 0.625
    assert res["rank_biserial"] == pytest.approx(0.625)
    assert ev.effect_size([1, 2, 3], [4, 5, 6], paired=False)["rank_biserial"] == 1.0


def test_proportion_ci_wilson():
    z2 = stats.norm.ppf(0.975) ** 2  # 3.841459
    assert ev.proportion_ci(0, 10) == pytest.approx((0.0, z2 / (10 + z2)))  # (0, 0.277533)
    assert ev.proportion_ci(10, 10) == pytest.approx((10 / (10 + z2), 1.0))
    assert ev.proportion_ci(0, 10)[1] == pytest.approx(0.277533, abs=1e-6)
    for k, n, conf in [(7, 20, 0.95), (56, 171, 0.95), (120, 171, 0.9), (269, 817, 0.99)]:
        ref = stats.binomtest(k, n).proportion_ci(confidence_level=conf, method="wilson")
        assert ev.proportion_ci(k, n, conf) == pytest.approx((ref.low, ref.high))
    with pytest.raises(ValueError, match="k=5, n=3"):
        ev.proportion_ci(5, 3)


def test_compare_and_describe_change_use_the_computed_numbers():
    res = ev.compare(BEFORE, AFTER, paired=True, n_resamples=2000)
    assert set(res) >= {"before", "after", "mann_whitney", "wilcoxon", "bootstrap", "effect_size"}
    text = ev.describe_change("reward", res)
    b, a, boot = res["before"]["mean"], res["after"]["mean"], res["bootstrap"]
    assert text.startswith(f"Mean reward rose from {b:.2f} to {a:.2f} ({a - b:+.2f}, 95% CI")
    assert f"[{boot['ci_low']:.2f}, {boot['ci_high']:.2f}]" in text
    d_av = (a - b) / math.sqrt((np.var(BEFORE, ddof=1) + np.var(AFTER, ddof=1)) / 2)
    assert res["effect_size"]["d_av"] == pytest.approx(d_av) and 0.2 < d_av < 0.5
    assert f"Wilcoxon p = {res['wilcoxon']['p']:.2g}, d_av = {d_av:+.2f}: a small shift up." in text
    down = ev.compare(AFTER, BEFORE, paired=False, n_resamples=2000)
    text = ev.describe_change("reward", down)
    assert "fell" in text and f"Mann-Whitney p = {down['mann_whitney']['p']:.2g} >= 0.05" in text
    assert text.endswith(": no detectable change.") and "wilcoxon" not in down


def test_verdict_calls_a_tiny_consistent_shift_with_tiny_p_negligible():
    """The issue's case: every text moved by a hair, so p is tiny, but nobody would notice the change."""
    rng = np.random.default_rng(0)
    before = 1.10 + rng.normal(0, 0.3, 60)
    after = before + 0.002 + rng.normal(0, 0.0005, 60)  # +0.002 on a spread of 0.3
    res = ev.compare(before, after, n_resamples=2000)
    assert res["wilcoxon"]["p"] < 1e-6 and res["effect_size"]["cohens_d"] > 2  # d_z alone would say "large"
    v = ev.verdict(res)
    assert v["label"] == "statistically detectable but negligible" and abs(v["d_av"]) < 0.02
    text = ev.describe_change("neutral logit", res)
    assert text.endswith("statistically detectable but negligible.") and "significant shift" not in text
    assert "+0.0020" in text and "(+0.00," not in text  # enough decimals to show the shift and its interval
    assert "[0.00, 0.00]" not in text
    # a near-constant metric (the tiny run's CoLA logit: spread 4e-6) moved by a hair: d_av is huge, the shift is not
    flat = 1.2433 + rng.normal(0, 4e-6, 24)
    hair = ev.compare(flat, flat + 3.3e-5 + rng.normal(0, 2e-6, 24), n_resamples=500)
    assert hair["effect_size"]["d_av"] > 2 and hair["wilcoxon"]["p"] < 0.05
    text = ev.describe_change("cola logit", hair)
    assert text.endswith("of the mean's size: statistically detectable but negligible.") and "+0.0000" in text
    # a smallest change that matters, in the metric's units, also makes it negligible
    big = ev.compare(BEFORE, [x + 0.05 for x in BEFORE], n_resamples=500)
    assert ev.verdict(big)["label"] == "statistically detectable but negligible"
    large = ev.compare(BEFORE, [x + 5.0 + 0.1 * (i % 3) for i, x in enumerate(BEFORE)], n_resamples=500)
    assert ev.verdict(large)["label"] == "a large shift up"
    assert ev.verdict(large, min_effect=10.0)["label"] == "statistically detectable but negligible"


def test_length_bias_check_drops_truncated_answers():
    """Long answers that the reward model saw cut off score like short ones and hide the length preference."""
    rng = np.random.default_rng(1)
    lengths = np.arange(10, 70, 2.0)  # 30 answers
    rewards = 0.05 * lengths + rng.normal(0, 0.4, lengths.size)
    truncated = lengths >= 56  # the 7 longest exceed the window ...
    rewards[truncated] = rng.normal(0.0, 0.2, truncated.sum())  # ... and were scored on a cut answer
    check = ev.length_bias_check(rewards, lengths, truncated)
    kept = ~truncated
    rho = stats.spearmanr(lengths[kept], rewards[kept]).statistic
    assert check["n"] == 23 and check["n_truncated"] == 7 and check["spearman_rho"] == pytest.approx(rho)
    assert check["rho_with_truncated"] == pytest.approx(stats.spearmanr(lengths, rewards).statistic)
    assert check["rho_with_truncated"] < 0.3 < check["spearman_rho"]  # truncation hid the bias
    half = 1.959964 * math.sqrt((1 + rho ** 2 / 2) / (23 - 3))  # Fisher z, Bonett-Wright standard error
    assert (check["ci_low"], check["ci_high"]) == pytest.approx((math.tanh(math.atanh(rho) - half),
                                                                 math.tanh(math.atanh(rho) + half)), abs=1e-5)
    assert check["verdict"].startswith("the reward model pays for length (rho = ")
    assert f"CI [{check['ci_low']:.2f}, {check['ci_high']:.2f}], on 23 answers" in check["verdict"]
    flat = ev.length_bias_check(rng.normal(0, 1, 12), np.arange(12.0))
    assert flat["n_truncated"] == 0 and "cannot rule out a moderate one" in flat["verdict"]
    with pytest.raises(ValueError, match="3 truncation flags"):
        ev.length_bias_check([1, 2, 3, 4], [1, 2, 3, 4], [False] * 3)


def test_truncated_mask_counts_the_pair_encoding(tiny_paths):
    from sawyer import loading

    tok = loading.load_tokenizer(str(tiny_paths["roberta"]))
    q, short, long = "Why?", "Because.", " ".join(["because"] * 80)
    mask = ev.truncated_mask(tok, [q, q], [short, long], max_length=32)
    assert mask == [False, True]
    n = len(tok(q, short)["input_ids"])
    assert ev.truncated_mask(tok, [q], [short], max_length=n) == [False]
    assert ev.truncated_mask(tok, [q], [short], max_length=n - 1) == [True]


def test_banner_only_on_tiny():
    assert "meaningless" in ev.banner("tiny") and ev.banner("t4") == ""


# --------------------------------------------------------------------------- models
@pytest.fixture(scope="module")
def llama():
    from sawyer import loading, tiny

    path = str(tiny.build("llama"))
    torch.manual_seed(0)
    return loading.load_causal_lm(path, dtype=torch.float32), loading.load_tokenizer(path)


@pytest.fixture(scope="module")
def t5():
    from sawyer import loading, tiny

    path = str(tiny.build("t5"))
    return loading.load_seq2seq_lm(path, dtype=torch.float32), loading.load_tokenizer(path)


PROMPTS = ["###HUMAN### What is the capital of France? ###BOT###", "The news today", "Summarize: the quick brown "
           "fox jumps over the lazy dog while the farmer watches", "hi"]


def test_generate_batched_equals_unbatched_greedy(llama, t5):
    for model, tok in (llama, t5):
        side = tok.padding_side
        batched = ev.generate(model, tok, PROMPTS, max_new_tokens=10, batch_size=4, progress=False)
        single = [ev.generate(model, tok, [p], max_new_tokens=10, batch_size=1, progress=False)[0]
                  for p in PROMPTS]
        assert batched == single and all(isinstance(s, str) for s in batched)
        assert tok.padding_side == side  # restored


def test_generate_cuts_at_stop_token_and_returns_only_new_text(llama):
    model, tok = llama
    enc = tok(PROMPTS[1], return_tensors="pt")
    new = model.generate(**enc, max_new_tokens=10, do_sample=False)[0, enc["input_ids"].shape[1]:].tolist()
    stop = new[4]
    expected = tok.decode(new[:new.index(stop)], skip_special_tokens=True)
    out = ev.generate(model, tok, [PROMPTS[1]], max_new_tokens=10, stop_token_ids=[stop], progress=False)
    assert out == [expected]
    assert out[0] != ev.generate(model, tok, [PROMPTS[1]], max_new_tokens=10, progress=False)[0]
    sampled = ev.generate(model, tok, PROMPTS, max_new_tokens=6, do_sample=True, seed=3, progress=False)
    assert sampled == ev.generate(model, tok, PROMPTS, max_new_tokens=6, do_sample=True, seed=3, progress=False)


def test_sampled_generate_draws_with_ppos_sampling_loop(llama):
    """Causal sampling goes through ``ppo_models.sample_causal`` (generate's distribution, tested there): the same
    seed gives the same tokens as calling the loop directly on the left-padded batch."""
    from sawyer.ppo_models import sample_causal

    model, tok = llama
    prompts = sorted(PROMPTS, key=len)  # generate batches prompts in length order
    got = ev.generate(model, tok, prompts, max_new_tokens=7, batch_size=len(prompts), do_sample=True,
                      temperature=0.8, seed=11, progress=False)
    torch.manual_seed(11)
    side, tok.padding_side = tok.padding_side, "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    tok.padding_side = side
    with torch.no_grad():
        ids = sample_causal(model, enc["input_ids"], enc["attention_mask"], temperature=0.8, min_new_tokens=0,
                            max_new_tokens=7, stop_token_ids=(tok.eos_token_id,), pad_token_id=tok.pad_token_id)
    expected = []
    for row in ids.tolist():
        cut = row.index(tok.eos_token_id) if tok.eos_token_id in row else len(row)
        expected.append(tok.decode(row[:cut], skip_special_tokens=True))
    assert got == expected and any(got)


def test_answer_held_out_scores_every_sample_and_compares_prompt_means(llama, tmp_path):
    """Three samples per prompt: each is scored (a reward that counts characters, so we can recompute it), the
    per-prompt reward is their mean, and the jsonl keeps one row per answer. ``use`` records which model is
    active; here both names are the same model, so both get the same draws from the same seed."""
    import contextlib
    import json

    model, tok = llama
    used = []

    @contextlib.contextmanager
    def use(name):
        used.append(name)
        yield

    def reward(prompts, answers):  # depends on the answer, so a wrong pairing of answers and scores shows
        assert len(prompts) == len(answers)
        return torch.tensor([float(len(a)) - len(p) / 100 for p, a in zip(prompts, answers)])

    out = ev.answer_held_out(model, tok, PROMPTS, reward, use, ("sft", "ppo"), samples=3, max_new_tokens=8,
                             batch_size=4, extract=str.strip, seed=5, progress=False)
    assert used == ["sft", "ppo"] and out.prompt_ids == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    flat = out.all_answers["sft"]
    assert len(flat) == 12 and all(a == a.strip() for a in flat)
    assert len(set(flat[:3])) > 1  # three samples of one prompt differ: sampled, not repeated
    expected = [len(a) - len(PROMPTS[i]) / 100 for a, i in zip(flat, out.prompt_ids)]
    np.testing.assert_allclose(out.all_rewards["sft"], expected, rtol=1e-6)
    np.testing.assert_allclose(out.rewards["sft"], np.reshape(expected, (4, 3)).mean(1), rtol=1e-6)
    assert out.answers["sft"] == flat[::3] and out.lengths["sft"][0] == np.mean([len(a.split()) for a in flat[:3]])
    assert out.all_answers["sft"] == out.all_answers["ppo"]  # same model, same seed: the same draws
    out.write_jsonl(tmp_path / "rows.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and rows[4] == {"prompt_id": 1, "sample": 1, "model": "sft",
                                           "reward": pytest.approx(expected[4]), "length": len(flat[4].split())}
    with pytest.raises(ValueError, match="samples=0"):
        ev.answer_held_out(model, tok, PROMPTS, reward, use, ("sft",), samples=0, max_new_tokens=4)


@dataclass
class Q:  # the attributes of sawyer.data.MCQuestion
    question: str
    choices: list
    answer: int


QUESTIONS = ["What is the capital of France?", "Who wrote the news summary?", "Why is the sky blue?",
             "Name a large animal.", "What did the president announce?", "How do plants grow?"]


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _clean_words(tok) -> dict[str, int]:
    """Vocabulary words that tokenise as exactly one token after a space: single-token choices."""
    out = {}
    for t, i in tok.get_vocab().items():
        w = t[1:]
        if t.startswith("Ġ") and w.isalpha() and len(w) >= 3 and _ids(tok, " " + w) == [i]:
            out[w] = i
    return out


def _constructed(model, tok, template: str) -> list[Q]:
    """Each question's right answer is, by construction, the model's most probable clean next word."""
    words = _clean_words(tok)
    names, ids = list(words), torch.tensor(list(words.values()))
    rng = random.Random(0)
    out = []
    for q in QUESTIONS:
        enc = tok(template.format(question=q), return_tensors="pt")
        with torch.no_grad():
            if model.config.is_encoder_decoder:
                dec = torch.tensor([[model.config.decoder_start_token_id]])
                logits = model(**enc, decoder_input_ids=dec).logits[0, -1]
            else:
                logits = model(**enc).logits[0, -1]
        best = names[int(logits[ids].argmax())]
        choices = rng.sample([w for w in names if w != best], 3)
        answer = rng.randrange(4)
        choices.insert(answer, best)
        out.append(Q(q, choices, answer))
    return out


@pytest.mark.parametrize("which", ["llama", "t5"])
def test_loglik_scorer_finds_the_constructed_answer(which, llama, t5):
    model, tok = llama if which == "llama" else t5
    template = ev.PROMPTS["chat"] if which == "llama" else ev.PROMPTS["plain"]
    qs = _constructed(model, tok, template)
    for normalize in ("mean", "sum"):
        res = ev.score_choices_loglik(model, tok, qs, prompt_template=template, normalize=normalize,
                                      batch_size=5, label="constructed", progress=False)
        assert res["accuracy"] == 1.0 and res["n"] == 6 and res["label"] == "constructed"
        assert res["predictions"] == [q.answer for q in qs]
        assert (res["ci_low"], res["ci_high"]) == pytest.approx(ev.proportion_ci(6, 6))
    # wrong answer keys: every prediction is now an error, the predictions themselves do not move
    shifted = [Q(q.question, q.choices, (q.answer + 1) % 4) for q in qs]
    res = ev.score_choices_loglik(model, tok, shifted, prompt_template=template, progress=False)
    assert res["accuracy"] == 0.0 and res["predictions"] == [q.answer for q in qs]
    # reversed choices: the prediction follows the right word to its new place
    rev = [Q(q.question, q.choices[::-1], 3 - q.answer) for q in qs]
    assert ev.score_choices_loglik(model, tok, rev, prompt_template=template, progress=False)["accuracy"] == 1.0


def _ref_logprob(model, prompt_ids, cont_ids):
    """Plain full log-softmax over one unpadded sequence: the parity reference."""
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            dec = torch.tensor([[model.config.decoder_start_token_id, *cont_ids]])
            lp = model(input_ids=torch.tensor([prompt_ids]), decoder_input_ids=dec).logits[0].log_softmax(-1)
            return float(sum(lp[i, t] for i, t in enumerate(cont_ids)))
        lp = model(input_ids=torch.tensor([prompt_ids + cont_ids])).logits[0].log_softmax(-1)
        return float(sum(lp[len(prompt_ids) - 1 + i, t] for i, t in enumerate(cont_ids)))


def _varied(tok) -> list[Q]:
    words = sorted(_clean_words(tok))
    rng = random.Random(1)
    return [Q(q, [" ".join(rng.sample(words, rng.randint(1, 5))) for _ in range(rng.randint(2, 5))], 0)
            for q in QUESTIONS]


@pytest.mark.parametrize("which", ["llama", "t5"])
def test_loglik_batched_equals_single_and_reference(which, llama, t5):
    model, tok = llama if which == "llama" else t5
    qs = _varied(tok)
    batched = ev.score_choices_loglik(model, tok, qs, normalize="sum", batch_size=7, progress=False)
    single = ev.score_choices_loglik(model, tok, qs, normalize="sum", batch_size=1, progress=False)
    for s_b, s_1, q in zip(batched["scores"], single["scores"], qs):
        np.testing.assert_allclose(s_b, s_1, atol=1e-4)
        prompt = tok(ev.PROMPTS["chat"].format(question=q.question))["input_ids"]
        ref = [_ref_logprob(model, prompt, _ids(tok, " " + c)) for c in q.choices]
        np.testing.assert_allclose(s_b, ref, atol=1e-4)
    mean = ev.score_choices_loglik(model, tok, qs, normalize="mean", progress=False)
    n_tok = len(_ids(tok, " " + qs[0].choices[1]))
    assert mean["scores"][0][1] == pytest.approx(batched["scores"][0][1] / n_tok, abs=1e-5)


def test_loglik_scorer_works_on_a_peft_model(llama):
    from peft import LoraConfig, get_peft_model

    model, tok = llama
    qs = _varied(tok)[:3]
    base = ev.score_choices_loglik(model, tok, qs, progress=False)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    try:  # a fresh LoRA adapter is a no-op (B = 0): same scores, same generations
        scores = ev.score_choices_loglik(peft_model, tok, qs, progress=False)["scores"]
        for got, want in zip(scores, base["scores"]):
            np.testing.assert_allclose(got, want, atol=1e-5)
        assert ev.generate(peft_model, tok, PROMPTS[:2], max_new_tokens=5, progress=False) == \
            ev.generate(model, tok, PROMPTS[:2], max_new_tokens=5, progress=False)
    finally:
        peft_model.unload()


class _SplitLetters:
    """Tokenizer wrapper that spells " X" as two tokens (" " then "X"), like tokenizers without " A" merges."""

    def __init__(self, tok, letters):
        self.tok, self.letters = tok, letters

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def __call__(self, text, **kwargs):
        if len(text) == 2 and text[0] == " " and text[1] in self.letters:
            return {"input_ids": self.tok.convert_tokens_to_ids(["Ġ", text[1]])}
        return self.tok(text, **kwargs)


@pytest.mark.parametrize("split", ["", "ABCDE", "A"])  # fast path; fast path with a shared prefix; slow path
def test_letter_scorer_matches_reference(split, llama):
    model, base_tok = llama
    tok = _SplitLetters(base_tok, split)
    qs = _varied(base_tok)
    res = ev.score_letter_answer(model, tok, qs, batch_size=4, progress=False)
    for q, scores in zip(qs, res["scores"]):
        listed = "\n".join(f"{L}. {c}" for L, c in zip("ABCDE", q.choices))
        prompt = tok(ev.LETTER_PROMPTS["chat"].format(question=q.question, choices=listed))["input_ids"]
        ref = [_ref_logprob(model, prompt, _ids(tok, " " + L)) for L in "ABCDE"[:len(q.choices)]]
        np.testing.assert_allclose(scores, ref, atol=1e-4)
    assert res["predictions"] == [int(np.argmax(s)) for s in res["scores"]]
    keyed = [Q(q.question, q.choices, p) for q, p in zip(qs, res["predictions"])]
    assert ev.score_letter_answer(model, tok, keyed, progress=False)["accuracy"] == 1.0
    wrong = [Q(q.question, q.choices, (p + 1) % len(q.choices)) for q, p in zip(qs, res["predictions"])]
    assert ev.score_letter_answer(model, tok, wrong, progress=False)["accuracy"] == 0.0


def test_letter_scorer_seq2seq_and_bad_answer_index(t5):
    model, tok = t5
    qs = _varied(tok)
    res = ev.score_letter_answer(model, tok, qs, template="plain", progress=False)
    assert res["n"] == len(qs) and 0.0 <= res["accuracy"] <= 1.0 and len(res["predictions"]) == len(qs)
    with pytest.raises(ValueError, match="question 0 .* answer 7"):
        ev.score_choices_loglik(model, tok, [Q("Why?", ["yes", "no"], 7)], progress=False)
