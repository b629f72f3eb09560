"""Presets: one code path, three sizes; only ids, sizes and budgets differ."""
import dataclasses

import pytest

from sawyer import presets
from sawyer.ppo import PPOConfig


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown preset 'colab'.*auto, tiny, t4, a100"):
        presets.get_preset("colab")


def test_auto_is_tiny_without_a_gpu():
    assert presets.get_preset("auto").name == "tiny"


def test_a100_keeps_the_original_workshop_settings():
    p = presets.get_preset("a100")
    assert p.sft.base_model == "meta-llama/Meta-Llama-3-8B"
    assert (p.sft.lora_r, p.sft.lora_alpha, p.sft.lora_dropout, p.sft.lora_targets) == (128, 32, 0.05, "qv")
    assert (p.sft.learning_rate, p.sft.batch_size, p.sft.gradient_accumulation_steps) == (2e-4, 2, 4)
    assert p.sft.max_seq_len == 1024 and p.sft.eval_fraction == 0.2 and p.sft.seed == 42
    assert (p.reward.base_model, p.reward.learning_rate, p.reward.epochs) == ("roberta-base", 1e-6, 3.0)
    assert p.ppo.ppo.learning_rate == 1.41e-5 and p.ppo.ppo.batch_size == 8 and p.ppo.ppo.ppo_epochs == 2
    assert (p.ppo.ppo.min_new_tokens, p.ppo.ppo.max_new_tokens) == (128, 256)
    assert (p.ppo.n_prompts, p.ppo.n_test, p.ppo.max_prompt_tokens) == (2000, 200, 128)
    assert p.summary.policy == "google/flan-t5-small" and p.summary.ppo.learning_rate == 2e-5
    assert (p.summary.cola_weight, p.summary.sentiment_weight) == (1.0, 0.5)


def test_ppo_config_defaults_are_the_workshop_values():
    c = PPOConfig()
    assert (c.learning_rate, c.batch_size, c.ppo_epochs) == (1.41e-5, 8, 2)
    assert (c.kl_coef, c.adaptive_kl, c.kl_target, c.kl_horizon) == (0.2, True, 6.0, 10000)
    assert (c.gamma, c.lam, c.cliprange, c.vf_coef) == (1.0, 0.95, 0.2, 0.1)


def test_t4_uses_an_ungated_small_base_model():
    p = presets.get_preset("t4")
    assert not p.sft.base_model.startswith("meta-llama/")
    assert "1.5B" in p.sft.base_model or "0.5B" in p.sft.base_model


def test_presets_share_one_shape_and_tiny_is_offline():
    tiny, a100 = presets.as_dict(presets.get_preset("tiny")), presets.as_dict(presets.get_preset("a100"))
    assert tiny.keys() == a100.keys()
    for stage in ("summary", "sft", "reward", "ppo", "eval"):
        assert tiny[stage].keys() == a100[stage].keys()
    model_fields = [tiny["summary"]["policy"], tiny["summary"]["cola_model"], tiny["summary"]["sentiment_model"],
                    tiny["sft"]["base_model"], tiny["reward"]["base_model"]]
    assert all(m.startswith("tiny:") for m in model_fields)
    data_fields = [tiny["summary"]["dataset"], *tiny["sft"]["datasets"], tiny["reward"]["comparison_file"],
                   tiny["ppo"]["dataset"], tiny["eval"]["truthful_qa"], tiny["eval"]["mmlu"]]
    assert all(d.startswith("data/") for d in data_fields)


def test_overrides_replace_a_stage():
    p = presets.get_preset("tiny", sft=dataclasses.replace(presets.get_preset("tiny").sft, max_steps=3))
    assert p.sft.max_steps == 3 and p.name == "tiny"
