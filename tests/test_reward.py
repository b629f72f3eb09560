"""Tests of sawyer.reward: literal values of the pure functions, parity of the cross-encoder with a direct
transformers call, batching/truncation safety, a learning test on the real pretrained MiniLM, save/load."""
import dataclasses
import json
import math
import random
from dataclasses import dataclass

import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

from sawyer import reward, tiny
from sawyer.loading import load_classifier, load_tokenizer
from sawyer.presets import RewardConfig, SummaryConfig


@dataclass
class Pair:  # the attribute names of sawyer.data.ComparisonPair that the reward module reads
    question: str
    better: str
    worse: str
    score_diff: float = 1.0


# --------------------------------------------------------------------------- fixtures: small local models
@pytest.fixture(scope="module")
def bert_tok():
    """The real bert-base-uncased tokenizer shipped with MiniLM (instant, offline)."""
    return load_tokenizer(str(tiny.build("minilm")))


def _tiny_bert(folder, tok, num_labels, labels=None, seed=0):
    torch.manual_seed(seed)
    labels = labels or [f"LABEL_{i}" for i in range(num_labels)]
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512, num_labels=num_labels,
                     id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)},
                     problem_type="regression" if num_labels == 1 else None)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory, bert_tok):
    root = tmp_path_factory.mktemp("classifiers")
    return {"cola": _tiny_bert(root / "cola", bert_tok, 2, seed=1),
            "sentiment": _tiny_bert(root / "sentiment", bert_tok, 3, ["negative", "neutral", "positive"], seed=2)}


@pytest.fixture(scope="module")
def rm(tmp_path_factory, bert_tok):
    """A tiny random cross-encoder (num_labels=1) and its tokenizer."""
    path = _tiny_bert(tmp_path_factory.mktemp("rm"), bert_tok, 1, seed=3)
    return load_classifier(path).eval(), load_tokenizer(path)


TEXTS = ["The council approved the budget on Tuesday.", "budget the Tuesday on approved council",
         "A short one.", "Markets rose after the announcement, and analysts expected further gains next week."]


# --------------------------------------------------------------------------- pure functions, literal values
def test_pairwise_loss_literal_values():
    r_better, r_worse = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0])
    # -logsigmoid(x) = log(1 + exp(-x)): log(1 + e^-2) = 0.126928, log 2 = 0.693147
    assert reward.pairwise_loss(r_better, r_worse).item() == pytest.approx((0.126928 + 0.693147) / 2, abs=1e-6)
    # per-pair margin [1, 0]: log(1 + e^-1) = 0.313262
    margin = torch.tensor([1.0, 0.0])
    assert reward.pairwise_loss(r_better, r_worse, margin).item() == pytest.approx((0.313262 + 0.693147) / 2,
                                                                                   abs=1e-6)
    # scalar margin 2: diffs become [0, -2]: log 2 and log(1 + e^2) = 2.126928
    assert reward.pairwise_loss(r_better, r_worse, 2.0).item() == pytest.approx((0.693147 + 2.126928) / 2,
                                                                                abs=1e-6)


def test_combine_logits_literal_values():
    logits = {"cola": torch.tensor([[0.5, 2.0], [1.0, -1.0]]),
              "neutral": torch.tensor([[0.1, 3.0, 0.2], [0.0, -2.0, 4.0]])}
    out = reward.combine_logits(logits, {"cola": 1, "neutral": 1}, {"cola": 1.0, "neutral": 0.5})
    torch.testing.assert_close(out, torch.tensor([2.0 + 1.5, -1.0 - 1.0]))
    out = reward.combine_logits(logits, {"cola": 0, "neutral": 2}, {"cola": 2.0, "neutral": -1.0})
    torch.testing.assert_close(out, torch.tensor([1.0 - 0.2, 2.0 - 4.0]))
    with pytest.raises(ValueError, match="components differ"):
        reward.combine_logits(logits, {"cola": 1}, {"cola": 1.0, "neutral": 0.5})


def test_make_margins():
    pairs = [Pair("q", "a", "b", 3.0), Pair("q", "a", "b", 1.0)]
    torch.testing.assert_close(reward.make_margins(pairs, "score_diff", scale=0.5), torch.tensor([1.5, 0.5]))
    torch.testing.assert_close(reward.make_margins(pairs, "none"), torch.zeros(2))
    with pytest.raises(ValueError, match="score_diff"):
        reward.make_margins(pairs, "bogus")


def test_length_bias_literal():
    lengths = [10, 20, 30, 40, 50]
    out = reward.length_bias([2 * n + 1 for n in lengths], lengths)  # perfectly linear
    assert out["pearson_r"] == pytest.approx(1.0) and out["spearman_rho"] == pytest.approx(1.0)
    assert out["slope"] == pytest.approx(2.0) and out["intercept"] == pytest.approx(1.0) and out["n"] == 5
    assert out["pearson_p"] < 1e-6
    out = reward.length_bias(torch.tensor([1.0, 4.0, 9.0, 16.0, 100.0]), torch.tensor(lengths))  # monotone only
    assert out["spearman_rho"] == pytest.approx(1.0) and out["pearson_r"] < 0.95
    with pytest.raises(ValueError):
        reward.length_bias([1.0, 2.0], [1, 2, 3])


# --------------------------------------------------------------------------- classifier rewards
def test_classifier_label_by_name_matches_direct_call(classifiers):
    r = reward.ClassifierReward(classifiers["sentiment"], "neutral", weight=0.5, batch_size=3)
    model = AutoModelForSequenceClassification.from_pretrained(classifiers["sentiment"]).eval()
    tok = load_tokenizer(classifiers["sentiment"])
    with torch.no_grad():
        direct = torch.stack([model(**tok(t, return_tensors="pt")).logits[0, 1] for t in TEXTS])
    torch.testing.assert_close(r.score(TEXTS), direct, atol=1e-5, rtol=0)
    out = r(["ignored prompt"] * len(TEXTS), TEXTS)
    assert out.shape == (4,) and out.dtype == torch.float32 and out.device.type == "cpu"
    torch.testing.assert_close(out, 0.5 * direct, atol=1e-5, rtol=0)


def test_unknown_label_lists_available_labels(classifiers):
    with pytest.raises(ValueError, match=r"'LABEL_1'.*\['negative', 'neutral', 'positive'\]"):
        reward.ClassifierReward(classifiers["sentiment"], "LABEL_1")


def test_summary_reward_combines_cola_and_neutral(classifiers):
    cfg = dataclasses.replace(SummaryConfig(), cola_model=classifiers["cola"], sentiment_model=classifiers["sentiment"],
                              sentiment_label="neutral")
    combined = reward.summary_reward(cfg)
    assert combined.weights == {"cola": 1.0, "neutral": 0.5}
    parts = combined.breakdown(TEXTS)
    assert set(parts) == {"cola", "neutral"} and all(v.shape == (4,) for v in parts.values())
    torch.testing.assert_close(combined([""] * 4, TEXTS), parts["cola"] + 0.5 * parts["neutral"])
    again = reward.combine_rewards([(combined.components["cola"], 2.0)])  # tuple weight overrides
    torch.testing.assert_close(again([""] * 4, TEXTS), 2.0 * parts["cola"])


# --------------------------------------------------------------------------- cross-encoder: parity, batching, truncation
QS = ["What is the capital of France?", "How do I cook rice?", "Why?"]
AS = ["Paris.", "Rinse it, then simmer it in two parts water to one part rice until the water is absorbed.",
      "Because the sky scatters blue light more than red light, which is called Rayleigh scattering."]


def test_score_pairs_matches_direct_cross_encoder_call(rm):
    model, tok = rm
    with torch.no_grad():
        direct = torch.stack([model(**tok(q, a, return_tensors="pt")).logits[0, 0] for q, a in zip(QS, AS)])
    for bs in (1, 3):  # bs 3: the short pairs are padded in the batch
        torch.testing.assert_close(reward.score_pairs(model, tok, QS, AS, batch_size=bs), direct, atol=1e-5, rtol=0)
    model.train()  # scoring switches dropout off, then restores the caller's mode
    torch.testing.assert_close(reward.score_pairs(model, tok, QS, AS), direct, atol=1e-5, rtol=0)
    assert model.training
    model.eval()


def test_truncation_keeps_question_and_survives_long_question(rm):
    model, tok = rm
    enc = reward.encode_pairs(tok, ["How do I cook rice?"], ["rice " * 300], max_length=32)
    q_ids = tok("How do I cook rice?")["input_ids"]  # [CLS] question [SEP]
    assert enc["input_ids"].shape == (1, 32) and enc["input_ids"][0, :len(q_ids)].tolist() == q_ids
    long_q = "tell me everything about " * 400  # the question alone is far over max_length
    for max_length in (32, 512):
        out = reward.score_pairs(model, tok, [long_q, QS[0]], ["short answer", AS[0]], max_length=max_length)
        assert out.shape == (2,) and torch.isfinite(out).all()


def test_cross_encoder_reward_shape_batching_and_question_hook(rm):
    model, tok = rm
    prompts, responses = QS * 3, (AS * 3)[::-1]
    a = reward.CrossEncoderReward(model, tok, batch_size=2)(prompts, responses)
    b = reward.CrossEncoderReward(model, tok, batch_size=16)(prompts, responses)
    assert a.shape == (9,) and a.dtype == torch.float32 and a.device.type == "cpu"
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    chat = reward.CrossEncoderReward(model, tok, question_from_prompt=lambda p: p.split("###HUMAN### ")[1]
                                     .split(" ###BOT###")[0])
    torch.testing.assert_close(chat([f"###HUMAN### {q} ###BOT###" for q in prompts], responses), a, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        chat(["a", "b"], ["c"])


def test_save_load_round_trip(rm, tmp_path):
    model, tok = rm
    folder = reward.save_reward_model(model, tok, tmp_path / "rm")
    assert (folder / "model.safetensors").exists()
    before = reward.CrossEncoderReward(model, tok)(QS, AS)
    after = reward.CrossEncoderReward.from_pretrained(folder)(QS, AS)
    torch.testing.assert_close(after, before, atol=0, rtol=0)


def test_training_is_seeded_and_moves_weights(rm, tmp_path, bert_tok):
    path = _tiny_bert(tmp_path / "base", bert_tok, 1, seed=4)
    pairs = [Pair(q, a, b, 2.0) for q, a, b in zip(QS, AS, AS[1:] + AS[:1])]
    cfg = RewardConfig(max_length=48, learning_rate=1e-3, batch_size=2, max_steps=3, seed=7)
    runs = []
    for i in range(2):
        model, tok = load_classifier(path), load_tokenizer(path)
        head = model.classifier.weight.detach().clone()
        hist = reward.train_reward_model(model, tok, pairs, cfg, run_dir=tmp_path / f"run{i}", progress=False,
                                         log_every=2)
        assert not torch.equal(model.classifier.weight, head) and not model.training
        runs.append((hist, reward.score_pairs(model, tok, QS, AS)))
    assert runs[0][0] == runs[1][0] and [r["step"] for r in runs[0][0]] == [2, 3]
    torch.testing.assert_close(runs[0][1], runs[1][1], atol=0, rtol=0)
    logged = [json.loads(line) for line in (tmp_path / "run0" / "reward_log.jsonl").read_text().splitlines()]
    assert logged == runs[0][0] and {"step", "loss/pairwise", "train/accuracy"} <= set(logged[0])


def test_half_precision_model_is_upcast_for_training(tmp_path, bert_tok):
    path = _tiny_bert(tmp_path / "base", bert_tok, 1, seed=5)
    model, tok = load_classifier(path, dtype=torch.bfloat16), load_tokenizer(path)
    cfg = RewardConfig(max_length=32, learning_rate=1e-3, batch_size=2, max_steps=1, seed=0, margin="none")
    with pytest.warns(UserWarning, match="not fp32"):
        hist = reward.train_reward_model(model, tok, [Pair(QS[0], AS[0], AS[1])], cfg, progress=False)
    assert all(p.dtype == torch.float32 for p in model.parameters()) and hist[0]["step"] == 1


# --------------------------------------------------------------------------- learning test on the real MiniLM
TOPICS = {
    "cats": ("What do cats like to eat?", "Cats like to eat fish and meat."),
    "rain": ("Why does it rain?", "Rain falls when water vapour in clouds condenses into drops."),
    "python": ("How do I print text in Python?", "In Python you call print with the text in quotes."),
    "bread": ("How is bread made?", "Bread is made by mixing flour, water and yeast, then baking the dough."),
    "moon": ("Why does the moon have phases?", "The moon's phases come from how much of its sunlit side we see."),
    "guitar": ("How many strings does a guitar have?", "A standard guitar has six strings."),
    "coffee": ("Where does coffee come from?", "Coffee comes from roasted beans of the coffee plant."),
    "football": ("How many players are on a football team?", "A football team has eleven players on the field."),
    "volcano": ("What causes a volcano to erupt?", "A volcano erupts when molten rock and gas push through the crust."),
    "bees": ("Why are bees important?", "Bees pollinate flowers and crops, so plants can make fruit."),
    "paris": ("What is the capital of France?", "The capital of France is Paris."),
    "piano": ("How do I learn the piano?", "Practise piano scales daily and learn simple songs first."),
    "sleep": ("How much sleep does an adult need?", "Most adults need seven to nine hours of sleep."),
    "tea": ("How do you brew green tea?", "Steep green tea leaves in hot, not boiling, water for two minutes."),
    "dog": ("How often should I walk my dog?", "Walk your dog at least twice a day."),
    "ocean": ("Why is the ocean salty?", "The ocean is salty because rivers carry dissolved minerals into it."),
    "bike": ("How do I fix a flat bike tire?", "Remove the bike tire, patch the inner tube and pump it up."),
    "sun": ("How hot is the sun?", "The sun's surface is about 5,500 degrees Celsius."),
    "chess": ("How does a knight move in chess?", "In chess a knight moves in an L shape."),
    "snow": ("Why is snow white?", "Snow looks white because its ice crystals scatter all colours of light."),
    "email": ("How do I write a polite email?", "Start the email with a greeting, be brief and thank the reader."),
    "apple": ("Are apples healthy?", "Apples are healthy: they have fibre and vitamin C."),
    "train": ("How fast can a train go?", "High-speed trains can go over 300 km per hour."),
    "tree": ("How do trees grow?", "Trees grow by turning sunlight, water and carbon dioxide into wood."),
    "money": ("How can I save money?", "Save money by budgeting and spending less than you earn."),
    "fish": ("How do fish breathe?", "Fish breathe with gills that take oxygen from the water."),
    "rice": ("How do I cook rice?", "Cook rice in two parts water to one part rice until it is absorbed."),
    "mars": ("Can people live on Mars?", "People cannot live on Mars yet: it has thin air and is very cold."),
    "swim": ("How do I learn to swim?", "Learn to swim by practising floating and kicking with a teacher."),
    "phone": ("Why does my phone battery drain?", "A phone battery drains fast when the screen and apps run a lot."),
}


def _topic_pairs(names, n, seed):
    """Better = the answer to this question, worse = the answer to another topic's question."""
    rng = random.Random(seed)
    return [Pair(TOPICS[t][0], TOPICS[t][1], TOPICS[u][1], 1.0) for t, u in (rng.sample(names, 2) for _ in range(n))]


def test_minilm_reward_model_learns_on_topic_preference(tmp_path):
    names = sorted(TOPICS)
    train, held_out = _topic_pairs(names[:22], 200, seed=0), _topic_pairs(names[22:], 40, seed=1)  # unseen topics
    path = str(tiny.build("minilm"))
    torch.manual_seed(0)  # the new num_labels=1 head's initialisation
    model, tok = load_classifier(path, num_labels=1), load_tokenizer(path)
    before = reward.pairwise_accuracy(model, tok, held_out, max_length=64)
    cfg = RewardConfig(base_model=path, max_length=64, learning_rate=1e-4, batch_size=8, max_steps=16, seed=0)
    hist = reward.train_reward_model(model, tok, train, cfg, eval_pairs=held_out, run_dir=tmp_path,
                                     progress=False, log_every=4)
    after = hist[-1]["eval/accuracy"]
    assert after >= 0.8 and after >= before + 0.25, (before, after)
    assert hist[-2]["loss/pairwise"] < hist[0]["loss/pairwise"] and all(math.isfinite(h["loss/pairwise"])
                                                                        for h in hist[:-1])
    margins = reward.reward_margins(model, tok, held_out, max_length=64)
    assert margins.shape == (40,) and (margins > 0).float().mean().item() == pytest.approx(after)
