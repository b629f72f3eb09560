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
    from sawyer.loading import split_revision  # hub ids carry a pinned commit: "org/name@sha"
    assert split_revision(p.sft.base_model)[0] == "meta-llama/Meta-Llama-3-8B"
    assert (p.sft.lora_r, p.sft.lora_alpha, p.sft.lora_dropout, p.sft.lora_targets) == (128, 32, 0.05, "qv")
    assert (p.sft.learning_rate, p.sft.batch_size, p.sft.gradient_accumulation_steps) == (2e-4, 2, 4)
    assert p.sft.max_seq_len == 1024 and p.sft.eval_fraction == 0.2 and p.sft.seed == 42
    assert (split_revision(p.reward.base_model)[0], p.reward.learning_rate, p.reward.epochs) == \
        ("FacebookAI/roberta-base", 1e-6, 3.0)
    assert p.ppo.ppo.learning_rate == 1.41e-5 and p.ppo.ppo.batch_size == 8 and p.ppo.ppo.ppo_epochs == 2
    # the original drew each batch's max from [128, 256) with a small minimum (issue 12: a minimum of 128 forced
    # answers the SFT model would have ended)
    assert (p.ppo.ppo.min_new_tokens, p.ppo.ppo.max_new_tokens) == (4, 192)
    assert (p.ppo.n_prompts, p.ppo.n_test, p.ppo.max_prompt_tokens) == (2000, 200, 128)
    assert split_revision(p.summary.policy)[0] == "google/flan-t5-small" and p.summary.ppo.learning_rate == 2e-5
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


# --------------------------------------------------------------------------- every config checks its fields
NAN = float("nan")


@pytest.mark.parametrize("stage, field, value, message", [
    ("summary", "steps", 0, r"SummaryConfig\.steps must be an integer >= 1, got 0"),
    ("summary", "n_train", -5, r"SummaryConfig\.n_train must be an integer >= 1, got -5"),
    ("summary", "test_max_chars", 100, r"SummaryConfig\.test_max_chars must be an integer >= 200, got 100"),
    ("summary", "cola_weight", NAN, r"SummaryConfig\.cola_weight must be a finite number, got nan"),
    ("summary", "policy", "", r"SummaryConfig\.policy must be a non-empty string, got ''"),
    ("summary", "ppo", None, r"SummaryConfig\.ppo must be a PPOConfig, got 'NoneType'"),
    ("sft", "datasets", "data/guanaco", r"SFTConfig\.datasets must be a non-empty tuple .*got 'data/guanaco'"),
    ("sft", "eval_fraction", 0.0, r"SFTConfig\.eval_fraction must be a finite number in \(0, 1\), got 0\.0"),
    ("sft", "eval_fraction", 1.0, r"SFTConfig\.eval_fraction must be a finite number in \(0, 1\), got 1\.0"),
    ("sft", "learning_rate", NAN, r"SFTConfig\.learning_rate must be a finite number > 0, got nan"),
    ("sft", "learning_rate", 0, r"SFTConfig\.learning_rate must be a finite number > 0, got 0"),
    ("sft", "batch_size", 0, r"SFTConfig\.batch_size must be an integer >= 1, got 0"),
    ("sft", "batch_size", 2.0, r"SFTConfig\.batch_size must be an integer >= 1, got 2\.0"),
    ("sft", "max_steps", 0, r"SFTConfig\.max_steps must be -1 \(run the epochs\) or an integer >= 1, got 0"),
    ("sft", "lora_dropout", 1.0, r"SFTConfig\.lora_dropout must be a finite number in \[0, 1\), got 1\.0"),
    ("sft", "lora_targets", "all", r"SFTConfig\.lora_targets must be one of 'qv', 'all-linear', got 'all'"),
    ("sft", "max_rows", 0, r"SFTConfig\.max_rows must be None or an integer >= 1, got 0"),
    ("sft", "load_in_4bit", "false", r"SFTConfig\.load_in_4bit must be True or False, got 'false'"),
    ("sft", "phrases", {"###STOP###": ""}, r"SFTConfig\.phrases must map markers to non-empty phrases"),
    ("reward", "margin", "scores", r"RewardConfig\.margin must be one of 'score_diff', 'none', got 'scores'"),
    ("reward", "max_length", 1, r"RewardConfig\.max_length must be an integer >= 2, got 1"),
    ("reward", "epochs", float("inf"), r"RewardConfig\.epochs must be a finite number > 0, got inf"),
    ("reward", "margin_scale", -1.0, r"RewardConfig\.margin_scale must be a finite number >= 0, got -1\.0"),
    ("ppo", "steps", 0, r"SawyerPPOConfig\.steps must be an integer >= 1, got 0"),
    ("ppo", "n_test", 2000, r"SawyerPPOConfig\.n_prompts must be an integer >= 2001, got 2000"),  # no train prompts
    ("ppo", "checkpoint_every", 0, r"SawyerPPOConfig\.checkpoint_every must be an integer >= 1, got 0"),
    ("ppo", "seed", -1, r"SawyerPPOConfig\.seed must be an integer >= 0, got -1"),
    ("eval", "n_test", 0, r"EvalConfig\.n_test must be an integer >= 1, got 0"),
    ("eval", "bootstrap_samples", 0, r"EvalConfig\.bootstrap_samples must be an integer >= 1, got 0"),
    ("eval", "max_questions", 0, r"EvalConfig\.max_questions must be None or an integer >= 1, got 0"),
    ("dpo", "beta", 0.0, r"SawyerDPOConfig\.beta must be a finite number > 0, got 0\.0"),
    ("grpo", "group_size", 1, r"SawyerGRPOConfig\.group_size must be an integer >= 2, got 1"),
    ("grpo", "temperature", 0.0, r"SawyerGRPOConfig\.temperature must be a finite number > 0, got 0\.0"),
])
def test_an_invalid_field_is_named_with_its_range(stage, field, value, message):
    """``dataclasses.replace`` re-runs ``__post_init__``: a notebook override fails on the line that makes it."""
    cfg = getattr(presets.get_preset("a100"), stage)
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(cfg, **{field: value})


def test_every_preset_is_valid_and_a_stage_mix_up_is_named():
    for name in presets.PRESETS:
        presets.get_preset(name)  # every field of every preset passes its own checks
    with pytest.raises(ValueError, match=r"Preset\.ppo must be a SawyerPPOConfig, got 'PPOConfig'"):
        presets.get_preset("tiny", ppo=PPOConfig())


def test_notebook_04_steps_zero_is_a_clear_message():
    """Notebook 04's set-up applies ``steps`` with ``dataclasses.replace``: 0 used to end in a KeyError."""
    from sawyer.validate import ConfigError

    cfg = presets.get_preset("tiny").ppo
    with pytest.raises(ConfigError, match=r"^SawyerPPOConfig\.steps must be an integer >= 1, got 0$"):
        dataclasses.replace(cfg, steps=int("0"))
    assert dataclasses.replace(cfg, steps=1).steps == 1


def test_a_run_folder_that_is_a_file_or_cannot_be_written_is_a_clear_error(tmp_path):
    """The run folder is resolved by ``sawyer.runs``; the mistakes a user makes get a message, not a traceback."""
    import os

    from sawyer.runs import resolve_run_dir

    (tmp_path / "notes.txt").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match=r"run folder .*notes\.txt is a file"):
        resolve_run_dir(tmp_path / "notes.txt", use_drive=False)
    if os.geteuid() == 0:  # root writes anywhere; sysfs refuses new folders even to root
        with pytest.raises(PermissionError, match=r"cannot create the run folder /sys/sawyer-run"):
            resolve_run_dir("/sys/sawyer-run", use_drive=False)
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        with pytest.raises(PermissionError, match="is read-only"):
            resolve_run_dir(locked, use_drive=False)
        with pytest.raises(PermissionError, match="cannot create the run folder"):
            resolve_run_dir(locked / "sub", use_drive=False)


def test_notebook_04_with_steps_zero_stops_at_its_set_up_with_the_field_named(tmp_path):
    """Through the real notebook: the override fails in the set-up cell, before any model or run folder."""
    from sawyer import notebooks

    with pytest.raises(notebooks.NotebookFailed) as err:
        notebooks.execute(notebooks.NOTEBOOK_DIR / "04_sawyer_ppo.ipynb", tmp_path / "04.ipynb",
                          {"preset": "tiny", "run_dir": str(tmp_path / "run"), "steps": 0}, timeout=300)
    assert "ConfigError: SawyerPPOConfig.steps must be an integer >= 1, got 0" in err.value.error
    assert "KeyError" not in err.value.error and not (tmp_path / "run" / "04_ppo").exists()
