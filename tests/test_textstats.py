"""Tests for sawyer.textstats: the log-odds word shift and its no-change baseline, and secondary metrics."""
import math

import pytest

from sawyer import DATA_DIR, data, textstats as ts


def test_log_odds_matches_the_formula_by_hand():
    before, after = ["a a a b"], ["a b b b"]
    res = ts.word_log_odds(before, after, prior_strength=4.0)
    # prior: both sets together, a 4 / b 4 of 8 words -> a_w = 2 each; n_a = n_b = 4, a_0 = 4
    a_w = 2.0
    delta_b = math.log((3 + a_w) / (4 + 4 - 3 - a_w)) - math.log((1 + a_w) / (4 + 4 - 1 - a_w))
    z_b = delta_b / math.sqrt(1 / (3 + a_w) + 1 / (1 + a_w))
    row = res["table"].set_index("word")
    assert row.loc["b", "log_odds"] == pytest.approx(delta_b) and row.loc["b", "z"] == pytest.approx(z_b)
    assert row.loc["a", "z"] == pytest.approx(-z_b)  # symmetric
    assert res["z_crit"] == pytest.approx(2.2414, abs=1e-4)  # Bonferroni over 2 words: Phi^-1(1 - 0.05 / 4)
    assert row.loc["b", "per_1000_after"] == 750.0 and res["vocabulary"] == 2
    with pytest.raises(ValueError, match="0 before"):
        ts.word_log_odds([""], ["x"])


def test_two_halves_of_the_same_text_give_no_significant_words():
    texts = data.load_news(str(DATA_DIR / "news-summary"), split="train")
    base = ts.no_change_baseline(texts, seed=0)
    assert base["n_significant"] == 0 and base["max_abs_z"] < base["z_crit"]
    first, second = texts[: len(texts) // 2], texts[len(texts) // 2:]  # unrelated halves, nothing "changed"
    assert not ts.word_log_odds(first, second)["table"]["significant"].any()
    # ... while a planted swap in the same texts is found, and is the top word both ways
    swapped = [t + " The plan was announced." for t in first]
    planted = [t + " The plan was scrapped." for t in first]
    table = ts.word_log_odds(planted, swapped)["table"]
    assert list(table["word"][:2]) in (["announced", "scrapped"], ["scrapped", "announced"])
    assert table.set_index("word").loc["announced", "z"] > 0 > table.set_index("word").loc["scrapped", "z"]
    assert table["significant"].sum() == 2


def test_replaced_words_finds_the_swap():
    before = ["Trump scrapped the deal.", "Markets fell.", "He scrapped it."]
    after = ["Trump announced the deal.", "Markets fell.", "He did it."]
    shift = ts.word_log_odds(before, after, prior_strength=10)
    found = ts.replaced_words(before, after, shift, k=3)
    assert [f["index"] for f in found] == [0, 2]  # the text where a risen word replaced it comes first
    assert found[0]["dropped"] == ["scrapped"] and found[0]["added"] == ["announced"]
    assert found[1]["added"] == ["did"]


def test_secondary_metrics_literal():
    assert ts.repetition("on on on on on") == pytest.approx(2 / 3)
    assert ts.repetition("the cat sat on the mat") == 0.0
    assert ts.distinct_n(["a b", "a c"], 1) == pytest.approx(3 / 4)
    assert ts.distinct_n(["a b", "a b"], 2) == pytest.approx(1 / 2)
    assert ts.relevance("How do I bake bread?", "Bake the bread at 220 degrees.") == pytest.approx(2 / math.sqrt(6))
    assert ts.relevance("How do I bake bread?", "Paris is in France.") == 0.0
    m = ts.text_metrics(["on on on on on", ""], prompts=["on?", "x"])
    assert m["n"] == 2 and m["mean_words"] == 2.5 and m["empty"] == 0.5 and m["repetition"] == pytest.approx(1 / 3)
    table = ts.metrics_table({"before": ["a b c"], "after": ["a a a a"]})
    assert list(table.index) == ["before", "after"] and table.loc["after", "distinct_1"] == 0.25
    with pytest.raises(ValueError, match="2 prompts for 1 texts"):
        ts.text_metrics(["x"], prompts=["a", "b"])
