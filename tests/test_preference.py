"""sawyer.preference: DPO pairs without leakage, the shared reward, TRL's DPO/GRPO on our adapters.

The training tests start from an "SFT" adapter made like notebook 02's (tiny Llama, untied ``lm_head``, the three
markers, LoRA with the marker rows as trainable tokens), with its LoRA and marker rows perturbed so that the SFT
model differs from the base: a reference that silently fell back to the base model would then be caught.
"""
import dataclasses
import math

import pytest
import torch

from sawyer import chat, data, preference, sft, tokens
from sawyer.data import ComparisonPair
from sawyer.loading import load_classifier, load_tokenizer
from sawyer.presets import get_preset
from sawyer.reward import CrossEncoderReward

TINY = get_preset("tiny")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def sft_adapter(tmp_path_factory):
    """A saved SAWYER-style adapter whose LoRA and marker rows are not at their initial values."""
    torch.manual_seed(0)
    model, tok, _ = sft.prepare_sawyer_model(TINY.sft, verbose=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    folder = tmp_path_factory.mktemp("sft") / "adapter"
    tokens.save_adapter(model, tok, folder)
    return folder


def load_policy(folder):
    return tokens.load_adapter(TINY.sft.base_model, folder, is_trainable=True)


# --------------------------------------------------------------------------- data
def test_dpo_pairs_come_from_the_train_split_only():
    cfg = TINY.reward
    pairs = data.load_comparisons(cfg.comparison_file, max_items=cfg.max_items)
    train, held_out = data.split_by_group(pairs, "item", cfg.eval_fraction, cfg.seed)  # as notebook 03
    tok = load_tokenizer(TINY.sft.base_model)
    tok.add_tokens([chat.HUMAN, chat.BOT, chat.STOP], special_tokens=True)
    examples, stats = preference.dpo_examples(train, tok, 10_000, held_out_pairs=held_out)
    assert stats == {"kept": len(train), "empty": 0, "too_long": 0}
    prompts = {tok.decode(e["prompt_ids"], skip_special_tokens=False) for e in examples}
    bos = tok.bos_token or ""
    train_prompts = {bos + chat.format_prompt(p.question) for p in train}
    held_prompts = {bos + chat.format_prompt(p.question) for p in held_out}
    assert prompts <= train_prompts and not prompts & held_prompts and held_prompts
    # the layout SFT trained: completion " answer ###STOP###", no EOS after it
    stop = tok.convert_tokens_to_ids(chat.STOP)
    assert all(e["chosen_ids"][-1] == stop and e["rejected_ids"][-1] == stop for e in examples)
    assert tok.decode(examples[0]["chosen_ids"]) == f" {train[0].better.strip()} {chat.STOP}"
    # a held-out pair slipped into the training list is refused, by item and question
    with pytest.raises(ValueError, match=f"item {held_out[0].item}"):
        preference.dpo_examples(train + held_out[:1], tok, 10_000, held_out_pairs=held_out)


def test_dpo_examples_drop_empty_and_too_long_pairs():
    tok = load_tokenizer(TINY.sft.base_model)
    tok.add_tokens([chat.HUMAN, chat.BOT, chat.STOP], special_tokens=True)
    pairs = [ComparisonPair("Q1?", "good answer", "bad", 3, 8, 5, item=0),
             ComparisonPair("Q2?", "   ", "bad", 3, 8, 5, item=1),
             ComparisonPair("Q3?", "long " * 200, "short", 3, 8, 5, item=2)]
    examples, stats = preference.dpo_examples(pairs, tok, 64)
    assert stats == {"kept": 1, "empty": 1, "too_long": 1} and len(examples) == 1
    with pytest.raises(ValueError, match="no DPO pairs left"):
        preference.dpo_examples(pairs[1:], tok, 64)


def test_ppo_prompt_split_is_notebook_04s():
    tok = load_tokenizer(TINY.sft.base_model)
    train, test = preference.ppo_prompt_split(TINY.ppo, tok)
    assert len(test) == TINY.ppo.n_test and not set(train) & set(test)
    assert all(p.startswith(chat.HUMAN) and p.endswith(chat.BOT) for p in train)
    again, test_again = preference.ppo_prompt_split(TINY.ppo, tok)
    assert (again, test_again) == (train, test)


def test_dpo_loss_literal():
    loss = preference.dpo_loss(torch.tensor([-8.0, -10.0]), torch.tensor([-12.0, -10.0]),
                               torch.tensor([-10.0, -10.0]), torch.tensor([-10.0, -10.0]), beta=0.1)
    # margins: (2 - (-2)) = 4 and 0; loss = -log sigmoid(0.1 * margin)
    torch.testing.assert_close(loss, torch.tensor([-math.log(1 / (1 + math.exp(-0.4))), math.log(2)]))


# --------------------------------------------------------------------------- the shared reward
def test_grpo_reward_is_ppos_reward_object_and_scores():
    torch.manual_seed(0)  # the new scalar head
    reward_fn = CrossEncoderReward(load_classifier("tiny:roberta", num_labels=1), load_tokenizer("tiny:roberta"),
                                   max_length=64, question_from_prompt=chat.question_from_prompt)
    adapter = preference.GRPOReward(reward_fn)
    assert adapter.reward_fn is reward_fn
    prompts = [chat.format_prompt("What is a cat?"), chat.format_prompt("Name a colour.")]
    completions = [" A small animal that purrs.", " Blue  "]  # TRL's decoded completions keep the spaces
    scores = adapter(prompts=prompts, completions=completions, completion_ids=[[1], [2]], trainer_state=None)
    expected = reward_fn(prompts, ["A small animal that purrs.", "Blue"])  # what PPO's rollout would pass
    assert scores == expected.tolist() and adapter.samples == 2
    assert scores != reward_fn(prompts, completions).tolist() or completions == [c.strip() for c in completions]

    def nan_reward(p, r):
        return torch.tensor([0.0, float("nan")])

    with pytest.raises(ValueError, match="non-finite score for completion 1"):
        preference.GRPOReward(nan_reward)(prompts, completions)


# --------------------------------------------------------------------------- training through TRL
def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def moved(model, before):
    return {n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])}


def plain_logprobs(model, input_ids, attention_mask, labels):
    """Per-token log-probs of ``labels`` from the model's ordinary forward and a full log-softmax (reference)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()  # (B, T-1, V)
    targets = labels[:, 1:]
    lp = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return lp * (targets != -100)


@pytest.fixture(scope="module")
def dpo_run(sft_adapter, tmp_path_factory):
    policy, tok = load_policy(sft_adapter)
    cfg = TINY.reward
    pairs = data.load_comparisons(cfg.comparison_file, max_items=cfg.max_items)
    train, held_out = data.split_by_group(pairs, "item", cfg.eval_fraction, cfg.seed)
    examples, _ = preference.dpo_examples(train[:16], tok, 128, held_out_pairs=held_out)
    sft_rows = preference.marker_rows(policy, tok)
    before = snapshot(policy)
    dcfg = dataclasses.replace(TINY.dpo, steps=3, batch_size=2, learning_rate=1e-2)
    out = tmp_path_factory.mktemp("dpo")
    result = preference.train_dpo(policy, tok, examples, dcfg, out / "trainer", progress=False)
    return dict(policy=policy, tok=tok, examples=examples, result=result, before=before, sft_rows=sft_rows, out=out)


def test_dpo_reference_is_the_sft_adapter(dpo_run):
    first = dpo_run["result"]["log"][0]
    # policy == reference (the SFT adapter, marker rows included) at the first step: margin 0, loss log 2
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert dpo_run["result"]["log"][-1]["loss"] != pytest.approx(math.log(2), abs=1e-4), "nothing trained"
    assert list(dpo_run["policy"].peft_config) == ["default"], "the reference adapter is removed after training"


def test_dpo_moves_only_lora(dpo_run):
    changed = moved(dpo_run["policy"], dpo_run["before"])
    assert changed and all(".lora_" in n and ".default." in n for n in changed)
    lora = {n for n in dpo_run["before"] if ".lora_" in n and ".default." in n}
    assert len(changed) > len(lora) // 2
    assert torch.equal(preference.marker_rows(dpo_run["policy"], dpo_run["tok"]), dpo_run["sft_rows"])
    assert dpo_run["result"]["cost"]["samples_generated"] == 0 and dpo_run["result"]["cost"]["pairs_trained"] == 6


def test_fused_head_shim_gives_the_plain_log_probs(dpo_run):
    """TRL's fused LM head (patched in by the trainer) on our wrapped lm_head equals a plain forward."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    policy, tok = dpo_run["policy"], dpo_run["tok"]
    batch = DataCollatorForPreference(pad_token_id=tok.pad_token_id)(dpo_run["examples"][:3])
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        fused = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                       fused_lm_head=True, use_cache=False).log_probs
        plain = plain_logprobs(policy, batch["input_ids"], batch["attention_mask"], labels)
    torch.testing.assert_close(fused * (labels[:, 1:] != -100), plain, atol=1e-5, rtol=0)
    assert (labels[:, 1:] == tok.convert_tokens_to_ids(chat.STOP)).any(), "the marker rows are in the check"


def test_dpo_adapter_round_trips_with_marker_rows(dpo_run):
    tokens.save_adapter(dpo_run["policy"], dpo_run["tok"], dpo_run["out"] / "adapter")
    rt = preference.check_round_trip(dpo_run["policy"], dpo_run["tok"], dpo_run["out"] / "adapter",
                                     TINY.sft.base_model, dpo_run["sft_rows"])
    assert rt.ok and rt.max_abs_logit_diff == 0.0, rt


def test_grpo_trains_lora_against_the_sft_reference_with_the_shared_reward(sft_adapter, tmp_path):
    policy, tok = load_policy(sft_adapter)
    sft_rows = preference.marker_rows(policy, tok)
    stop = tok.convert_tokens_to_ids(chat.STOP)
    seen = []

    def reward_fn(prompts, responses):  # rewards length, so the group advantages are not all zero
        seen.extend(responses)
        return torch.tensor([float(len(r)) for r in responses])

    reward = preference.GRPOReward(reward_fn)
    prompts = [chat.format_prompt(q) for q in ("What is a cat?", "Name a colour.", "Why is the sky blue?", "Hi!")]
    gcfg = dataclasses.replace(TINY.grpo, steps=2, group_size=2, prompts_per_step=2, max_new_tokens=8,
                               learning_rate=1e-2)
    before = snapshot(policy)
    result = preference.train_grpo(policy, tok, prompts, reward, gcfg, tmp_path / "trainer", progress=False)
    assert result["log"][0]["kl"] == pytest.approx(0.0, abs=1e-6), "reference = SFT adapter at step 1"
    assert result["cost"]["samples_generated"] == 2 * 2 * 2 == len(seen) == reward.samples
    assert stop in policy.generation_config.eos_token_id and not any(chat.STOP in r for r in seen)
    changed = moved(policy, before)
    assert changed and all(".lora_" in n and ".default." in n for n in changed)
    assert torch.equal(preference.marker_rows(policy, tok), sft_rows)
    assert list(policy.peft_config) == ["default"]
    tokens.save_adapter(policy, tok, tmp_path / "adapter")
    rt = preference.check_round_trip(policy, tok, tmp_path / "adapter", TINY.sft.base_model, sft_rows)
    assert rt.ok, rt


def test_cost_measures_time_and_memory():
    with preference.Cost() as c:
        x = torch.ones(2_000_000)  # 8 MB
        del x
    d = c.as_dict()
    assert d["wall_s"] >= 0 and d["peak_memory_gib"] > 0 and d["memory_kind"] in ("cpu_peak_rss", "cuda_max_allocated")


def test_markdown_table():
    import pandas as pd

    table = preference.markdown_table(pd.DataFrame({"a": [1.23456, 2.0]}, index=["x", "y"]))
    assert table == "|  | a |\n| --- | --- |\n| x | 1.235 |\n| y | 2 |\n"


def test_4bit_base_trains_lora_through_the_quantised_layers_and_keeps_marker_rows(sft_adapter, tmp_path):
    """The GPU path (4-bit NF4 base) on bitsandbytes' CPU backend: TRL casts trainable parameters to bf16 on a
    quantised model; the marker rows must not be among them (they would come back rounded), and the gradient
    must reach the first layer's LoRA through the 4-bit layers above it."""
    from sawyer.loading import is_4bit

    policy, tok = tokens.load_adapter(TINY.sft.base_model, sft_adapter, load_in_4bit=True, is_trainable=True)
    assert is_4bit(policy)
    sft_rows = preference.marker_rows(policy, tok)
    pairs = data.load_comparisons(TINY.reward.comparison_file, max_items=12)
    examples, _ = preference.dpo_examples(pairs, tok, 128)
    before = snapshot(policy)
    cfg = dataclasses.replace(TINY.dpo, steps=2, batch_size=2, learning_rate=1e-2, load_in_4bit=True)
    result = preference.train_dpo(policy, tok, examples, cfg, tmp_path / "dpo", progress=False)
    assert result["log"][0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    changed = moved(policy, before)
    assert all(".lora_" in n for n in changed) and any(".layers.0." in n for n in changed), changed
    assert all(p.dtype == torch.float32 for p in policy.parameters() if p.requires_grad)
    assert torch.equal(preference.marker_rows(policy, tok), sft_rows)
