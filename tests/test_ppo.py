"""Tests of sawyer.ppo: literal math, log-probs vs generate(), reference, gradients, learning, 4-bit, fp16.

Everything runs on the tiny models (CPU, offline) with fixed seeds.
"""
import dataclasses
import math
from collections import Counter

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from sawyer import checkpoints, loading, ppo, ppo_models
from sawyer.ppo import PPOConfig

DESIGN_STATS = ["objective/score", "objective/kl", "objective/entropy", "policy/approx_kl", "policy/clipfrac",
                "loss/policy", "loss/value", "val/explained_variance", "response/length", "time/generate",
                "time/score", "time/train", "objective/kl_coef"]


# ----------------------------------------------------------------------------- helpers
def make_policy(kind: str, *, seed: int = 0, load_in_4bit: bool = False, lora_dropout: float = 0.1,
                all_linear: bool = False):
    """A tiny base model with fresh LoRA on q/v (or all linear layers); dropout on, to prove PPO switches it off."""
    torch.manual_seed(seed)
    if kind == "llama":
        base = loading.load_causal_lm("tiny:llama", load_in_4bit=load_in_4bit)
        if load_in_4bit:
            base = loading.prepare_for_training(base, gradient_checkpointing=True)
        lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=lora_dropout, task_type="CAUSAL_LM",
                          target_modules="all-linear" if all_linear else ["q_proj", "v_proj"])
        tok = loading.load_tokenizer("tiny:llama")
    else:
        base = loading.load_seq2seq_lm("tiny:t5")
        lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=lora_dropout, task_type="SEQ_2_SEQ_LM",
                          target_modules="all-linear" if all_linear else ["q", "v"])
        tok = loading.load_tokenizer("tiny:t5")
    return get_peft_model(base, lora), tok


def prompts_for(kind: str, n: int = 8) -> list[str]:
    texts = ["The market opened higher today after", "Scientists said the new study shows", "The city council met",
             "A storm hit the coast on Monday and", "The team won the final game of", "Officials announced a plan to",
             "The report found that most people", "In the morning the president said", "Prices of food rose again",
             "The school will open a new"]
    texts = (texts * (n // len(texts) + 1))[:n]
    return ["summarize: " + t for t in texts] if kind == "t5" else texts


def snapshot(module, pattern=None):
    return {n: p.detach().clone() for n, p in module.named_parameters() if pattern is None or pattern in n}


def word_reward(word: str):
    """Fraction of the response's words equal to ``word`` (a simple text-level reward)."""
    def reward_fn(prompts, responses):
        out = []
        for r in responses:
            words = r.lower().split()
            out.append(sum(w.strip(".,;:!?\"'") == word for w in words) / max(1, len(words)))
        return torch.tensor(out)
    return reward_fn


# ----------------------------------------------------------------------------- literal values
def test_masked_mean_var_and_whiten_literal():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert ppo.masked_mean(x, mask).item() == pytest.approx(2.0)
    assert ppo.masked_var(x, mask).item() == pytest.approx(1.0)            # unbiased: (1 + 0 + 1) / 2
    torch.testing.assert_close(ppo.masked_whiten(x, mask), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(ppo.masked_whiten(x, mask, shift_mean=False), torch.tensor([[1.0, 2.0, 3.0, 0.0]]),
                               atol=1e-6, rtol=0)


def test_kl_penalty_rewards_literal():
    score = torch.tensor([1.0, 2.0])
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    ref_logprobs = torch.tensor([[-1.5, -2.0, -2.0], [-1.0, -2.0, -5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards = ppo.kl_penalty_rewards(score, logprobs, ref_logprobs, mask, kl_coef=0.1)
    # kl = [[0.5, 0, -1], [0, 1, (masked)]]; -0.1 * kl, score on the last unmasked token
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0, 1.1], [0.0, 1.9, 0.0]]))


def test_gae_hand_computed():
    # gamma 1, lambda 0.5: deltas 0.1, 0.1, 0.3 -> A2 = 0.3, A1 = 0.1 + 0.5 * 0.3, A0 = 0.1 + 0.5 * 0.25
    adv, ret = ppo.gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.6, 0.7]]), torch.ones(1, 3), 1.0, 0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.225, 0.25, 0.3]]))
    torch.testing.assert_close(ret, torch.tensor([[0.725, 0.85, 1.0]]))
    # gamma 0.9, lambda 0.5, last token masked (its reward and value must be ignored):
    # A1 = 1 + 0.9 * 0 - 0.4 = 0.6; A0 = (0.9 * 0.4 - 0.5) + 0.45 * 0.6 = 0.13
    adv, ret = ppo.gae(torch.tensor([[0.0, 1.0, 5.0]]), torch.tensor([[0.5, 0.4, 9.0]]),
                       torch.tensor([[1.0, 1.0, 0.0]]), 0.9, 0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.13, 0.6, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.63, 1.0, 0.0]]))


def test_clipped_policy_loss_literal():
    old = torch.zeros(1, 5)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1, 1.5, 3.0]]))
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 50.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    loss, stats = ppo.policy_loss(new, old, adv, mask, cliprange=0.2)
    # per token max(-A r, -A clip(r)): [-1.2, -0.5, 1.1, 1.5] -> mean 0.225; only token 0 is clipped
    assert loss.item() == pytest.approx(0.225, abs=1e-6)
    assert stats["clipfrac"] == pytest.approx(0.25)
    expected_kl = 0.5 * sum(math.log(r) ** 2 for r in (1.5, 0.5, 1.1, 1.5)) / 4
    assert stats["approx_kl"] == pytest.approx(expected_kl, rel=1e-5)


def test_clipped_value_loss_literal():
    values, old = torch.tensor([[1.5, 1.1, 7.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    returns, mask = torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    loss, clipfrac = ppo.value_loss(values, old, returns, mask, cliprange_value=0.2)
    # clipped values [1.2, 1.1]; max((v - R)^2, (v_clip - R)^2) = [0.64, 1.21]; 0.5 * mean = 0.4625
    assert loss.item() == pytest.approx(0.4625, abs=1e-6)
    assert clipfrac == pytest.approx(0.5)


def test_kl_controllers():
    ctl = ppo.AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(12.0, 8)  # error +1 clipped to +0.2
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 8 / 10000))
    ctl.update(3.0, 8)   # error -0.5 clipped to -0.2
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 8 / 10000) * (1 - 0.2 * 8 / 10000))
    fixed = ppo.FixedKLController(0.3)
    fixed.update(100.0, 8)
    assert fixed.value == 0.3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_logprobs_equal_full_log_softmax(dtype):
    torch.manual_seed(0)
    logits = (torch.randn(5, 7, 50) * 3).to(dtype).requires_grad_(True)
    labels = torch.randint(0, 50, (5, 7))
    full = torch.log_softmax(logits.float() / 0.7, -1).gather(-1, labels[..., None]).squeeze(-1)
    chunked = ppo.gather_logprobs(logits, labels, chunk_size=2, temperature=0.7)
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, full, atol=1e-6, rtol=0)
    grad_full, = torch.autograd.grad(full.sum(), logits)
    grad_chunked, = torch.autograd.grad(chunked.sum(), logits)  # through the checkpointed chunks
    torch.testing.assert_close(grad_chunked, grad_full)
    # min_new_tokens: banned stop ids in the first positions, renormalised over the rest
    banned = logits.detach().float().clone()
    banned[:, :3, [4, 9]] = float("-inf")
    expected = torch.log_softmax(banned, -1).gather(-1, labels[..., None]).squeeze(-1)
    got = ppo.gather_logprobs(logits.detach(), labels, 3, suppress_ids=(4, 9), suppress_until=3)
    ok = ~torch.isinf(expected)
    torch.testing.assert_close(got[ok], expected[ok], atol=1e-6, rtol=0)


def test_logprobs_at_temperature_one_with_ban_leave_the_logits_alone_and_match_the_full_gradient():
    """T = 1 takes the logits as they are (no copy) and the ban is out of place: the caller's logits stay intact."""
    torch.manual_seed(1)
    logits = (torch.randn(5, 6, 40) * 3).requires_grad_(True)
    before = logits.detach().clone()
    labels = torch.randint(0, 40, (5, 6))
    labels[:, :2] = labels[:, :2].where(~torch.isin(labels[:, :2], torch.tensor([3, 7])), torch.tensor(0))
    ban = torch.zeros(6, 40, dtype=torch.bool)
    ban[:2, [3, 7]] = True
    full = torch.log_softmax(logits.masked_fill(ban, torch.finfo(torch.float32).min), -1)
    full = full.gather(-1, labels[..., None]).squeeze(-1)
    got = ppo.gather_logprobs(logits, labels, chunk_size=2, suppress_ids=(3, 7), suppress_until=2)
    torch.testing.assert_close(got, full, atol=1e-6, rtol=0)
    assert torch.equal(logits.detach(), before)
    grad_full, = torch.autograd.grad(full.sum(), logits)
    grad_got, = torch.autograd.grad(got.sum(), logits)  # split chunks, checkpointed: one gradient, same values
    torch.testing.assert_close(grad_got, grad_full)
    assert grad_got[:, :2, [3, 7]].abs().max() == 0  # a banned token gets no gradient


# ----------------------------------------------------------------------------- fixtures and model helpers
@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices gain nothing from threads, and spinning threads crawl on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def perturb_lora(policy, seed=1, scale=0.3):
    """LoRA B starts at zero (adapter = identity); give it random weights so the adapter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def plain_logprobs(model, batch, temperature=1.0, causal=True):
    """Reference implementation: one full forward, full-vocabulary log-softmax, no chunking."""
    with torch.no_grad():
        if causal:
            ids = torch.cat([batch.prompt_ids, batch.response_ids], 1)
            attention = torch.cat([batch.prompt_mask, torch.ones_like(batch.response_ids)], 1)
            positions = (attention.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=attention, position_ids=positions).logits
            logits = logits[:, batch.prompt_ids.shape[1] - 1:-1]
        else:
            start = torch.zeros_like(batch.response_ids[:, :1])  # T5: decoder starts with pad (id 0)
            logits = model(input_ids=batch.prompt_ids, attention_mask=batch.prompt_mask,
                           decoder_input_ids=torch.cat([start, batch.response_ids[:, :-1]], 1)).logits
        logp = torch.log_softmax(logits.float() / temperature, -1)
        return logp.gather(-1, batch.response_ids[..., None]).squeeze(-1) * batch.mask


def lora_params(policy, adapter="default"):
    return {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_" in n and f".{adapter}." in n}


# ----------------------------------------------------------------------------- rollout
def test_rollout_masks_after_stop_token_and_respects_min_new_tokens():
    policy, tok = make_policy("llama")
    cfg = PPOConfig(min_new_tokens=3, max_new_tokens=12)
    # the stop token: the one this model samples most often after position 3 (setup re-seeds, so the second
    # rollout draws the same tokens up to each stop)
    probe = ppo.rollout(ppo.setup(policy, tok, cfg), prompts_for("llama", 8))
    stop = Counter(probe.response_ids[:, 3:][probe.mask[:, 3:] > 0].tolist()).most_common(1)[0][0]
    state = ppo.setup(policy, tok, cfg, stop_token_ids=[stop])
    assert set(state.stop_token_ids) == {tok.eos_token_id, stop}
    batch = ppo.rollout(state, prompts_for("llama", 8))
    ids, mask = batch.response_ids, batch.mask
    is_stop = torch.isin(ids, torch.tensor(state.stop_token_ids))
    assert not is_stop[:, :3].any(), "min_new_tokens=3: no stop token among the first 3"
    stopped_early = 0
    for b in range(len(batch)):
        first = int(is_stop[b].float().argmax()) if is_stop[b].any() else ids.shape[1] - 1
        assert mask[b, :first + 1].eq(1).all() and mask[b, first + 1:].eq(0).all()  # stop token kept, rest masked
        stopped_early += int(first + 1 < ids.shape[1])
        kept = ids[b, :first] if is_stop[b].any() else ids[b, :first + 1]
        assert batch.responses[b] == tok.decode(kept, skip_special_tokens=True).strip()
    assert stopped_early >= 2, "the test needs responses that stop before max_new_tokens"
    for t in (batch.logprobs, batch.ref_logprobs, batch.values):
        assert t.shape == ids.shape and t.dtype == torch.float32 and t[mask == 0].eq(0).all()


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_first_minibatch_ratio_is_one(kind):
    """Rollout log-probs equal the training pass's (temperature, min_new_tokens, padding, dropout, checkpointing)."""
    policy, tok = make_policy(kind, lora_dropout=0.3)
    perturb_lora(policy)
    cfg = PPOConfig(learning_rate=1e-3, temperature=0.7, min_new_tokens=2, max_new_tokens=10, mini_batch_size=4,
                    logprob_chunk_size=3, gradient_checkpointing=True)
    state = ppo.setup(policy, tok, cfg, base_reference=True)
    assert policy.get_base_model().is_activation_checkpointing
    batch = ppo.rollout(state, prompts_for(kind, 8))
    # the rollout's chunked log-probs equal a plain full log-softmax of the same model (min_new_tokens aside:
    # stop tokens are never sampled there, so only the renormalisation differs; compare from position 2 on)
    full = plain_logprobs(policy, batch, temperature=0.7, causal=kind == "llama")
    torch.testing.assert_close(batch.logprobs[:, 2:], full[:, 2:], atol=1e-5, rtol=0)
    stats = ppo.update(state, batch, torch.rand(8))
    assert stats["policy/first_minibatch_max_abs_logratio"] < 1e-5
    assert stats["policy/approx_kl"] > 0, "later minibatches do move away from the rollout policy"


# ----------------------------------------------------------------------------- reference
def test_reference_is_base_model_with_adapter_disabled_or_explicit():
    policy, tok = make_policy("llama")
    perturb_lora(policy)
    with pytest.raises(ValueError, match="SFT start.*lora_B is not zero.*base_reference=True"):
        ppo.setup(policy, tok, PPOConfig(max_new_tokens=8))  # a trained adapter: disabling it is not the start
    state = ppo.setup(policy, tok, PPOConfig(max_new_tokens=8), base_reference=True)
    batch = ppo.rollout(state, prompts_for("llama", 8))
    base = loading.load_causal_lm("tiny:llama").eval()
    torch.testing.assert_close(batch.ref_logprobs, plain_logprobs(base, batch), atol=1e-5, rtol=0)
    assert (batch.logprobs - batch.ref_logprobs).abs().max() > 1e-2, "the adapter changes the policy"
    # an explicit reference model gives the same numbers (setup re-seeds, so the samples are the same)
    explicit = ppo.setup(policy, tok, PPOConfig(max_new_tokens=8), ref_model=base)
    batch2 = ppo.rollout(explicit, prompts_for("llama", 8))
    assert torch.equal(batch2.response_ids, batch.response_ids)
    torch.testing.assert_close(batch2.ref_logprobs, batch.ref_logprobs, atol=1e-6, rtol=0)


def test_sft_adapter_as_frozen_reference(tmp_path):
    sft, tok = make_policy("llama")
    perturb_lora(sft)
    sft.save_pretrained(tmp_path / "sft")
    torch.manual_seed(0)
    policy = PeftModel.from_pretrained(loading.load_causal_lm("tiny:llama"), tmp_path / "sft", is_trainable=True)
    ref = ppo.add_frozen_reference_adapter(policy, tmp_path / "sft")
    n_base = sum(p.numel() for n, p in policy.named_parameters() if "lora_" not in n)
    assert n_base == sum(p.numel() for p in loading.load_causal_lm("tiny:llama").parameters()), "one base copy"
    state = ppo.setup(policy, tok, PPOConfig(learning_rate=1e-2, max_new_tokens=8), ref_adapter=ref)
    batch = ppo.rollout(state, prompts_for("llama", 8))
    torch.testing.assert_close(batch.ref_logprobs, batch.logprobs, atol=1e-6, rtol=0)  # starts as the SFT model
    with policy.disable_adapter():
        assert (plain_logprobs(policy, batch) - batch.ref_logprobs).abs().max() > 1e-2, "reference is not the base"
    before_ref, before_own = lora_params(policy, ref), lora_params(policy)
    ppo.update(state, batch, torch.rand(8))
    stats = ppo.update(state, ppo.rollout(state, prompts_for("llama", 8)), torch.rand(8))
    assert policy.active_adapter == "default" and stats["objective/kl"] != 0
    assert all(torch.equal(p, lora_params(policy, ref)[n]) for n, p in before_ref.items()), "reference moved"
    assert any(not torch.equal(p, lora_params(policy)[n]) for n, p in before_own.items()), "policy did not move"
    assert not any(p.requires_grad for n, p in policy.named_parameters() if f".{ref}." in n)
    # the reference pass still equals a fresh SFT model
    batch = ppo.rollout(state, prompts_for("llama", 8))
    fresh = PeftModel.from_pretrained(loading.load_causal_lm("tiny:llama"), tmp_path / "sft").eval()
    torch.testing.assert_close(batch.ref_logprobs, plain_logprobs(fresh, batch), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- learning
def run_ppo(kind, kl_coef, steps=15):
    """Raw scores (no shaping): the two betas below were calibrated against word_reward's own scale (0-1);
    normalised scores would be ~20x larger against the same beta."""
    policy, tok = make_policy(kind, lora_dropout=0.0, all_linear=True)
    cfg = PPOConfig(learning_rate=5e-3, batch_size=8, mini_batch_size=4, ppo_epochs=2, kl_coef=kl_coef,
                    adaptive_kl=False, min_new_tokens=2, max_new_tokens=10, gradient_checkpointing=False,
                    score_norm="none", score_clip=None, truncation_penalty=0.0)
    state = ppo.setup(policy, tok, cfg)
    return checkpoints.train(state, prompts_for(kind, 16), word_reward("the"), steps=steps, progress=False)


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_reward_rises_and_large_kl_coef_holds_policy_near_reference(kind):
    """Measured over seeds 0-3 when written: rise 0.18-0.73 (KL 5-27 nats); with beta=1: rise <= 0.08, KL <= 1.8."""
    free = run_ppo(kind, kl_coef=0.01)
    held = run_ppo(kind, kl_coef=1.0)
    score = lambda h: [s["objective/score"] for s in h]  # noqa: E731
    last3 = lambda h, key: sum(s[key] for s in h[-3:]) / 3  # noqa: E731
    rise_free = last3(free, "objective/score") - score(free)[0]
    rise_held = last3(held, "objective/score") - score(held)[0]
    kl_free, kl_held = last3(free, "objective/kl"), last3(held, "objective/kl")
    print(f"{kind}: rise {rise_free:.3f} (kl {kl_free:.2f}) vs held {rise_held:.3f} (kl {kl_held:.2f})")
    assert score(free)[0] == score(held)[0], "both runs start from the same first batch"
    assert rise_free > 0.1, f"reward did not rise: {score(free)}"
    assert kl_held < 3.0 and kl_held < kl_free / 4, f"large kl_coef should keep KL small: {kl_held} vs {kl_free}"
    assert rise_held < rise_free / 2, f"large kl_coef should slow the reward's rise: {rise_held} vs {rise_free}"


def test_training_moves_only_lora_and_value_head():
    policy, tok = make_policy("llama")
    cfg = PPOConfig(learning_rate=1e-2, max_new_tokens=8, mini_batch_size=2, gradient_accumulation_steps=2,
                    whiten_rewards=True, max_grad_norm=0.5)  # the non-default branches
    state = ppo.setup(policy, tok, cfg)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    in_optimizer = {id(p) for g in state.optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in policy.parameters() if p.requires_grad} | {
        id(p) for p in state.value_head.parameters()}
    base_before = {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_" not in n}
    lora_before, head_before = lora_params(policy), snapshot(state.value_head)
    checkpoints.train(state, prompts_for("llama", 8), word_reward("the"), steps=2, progress=False)
    assert all(torch.equal(p, dict(policy.named_parameters())[n]) for n, p in base_before.items())
    lora_after = lora_params(policy)
    assert all(not torch.equal(p, lora_after[n]) for n, p in lora_before.items() if "lora_B" in n)
    assert all(not torch.equal(p, dict(state.value_head.named_parameters())[n]) for n, p in head_before.items())


# ----------------------------------------------------------------------------- 4-bit
def test_one_ppo_step_with_a_4bit_policy():
    policy, tok = make_policy("llama", load_in_4bit=True)
    assert loading.is_4bit(policy)
    state = ppo.setup(policy, tok, PPOConfig(learning_rate=1e-2, mini_batch_size=4, max_new_tokens=6))
    before = lora_params(policy)
    stats = checkpoints.train(state, prompts_for("llama", 8), word_reward("the"), steps=1, progress=False)[0]
    assert all(math.isfinite(v) for v in stats.values())
    assert stats["policy/first_minibatch_max_abs_logratio"] < 1e-5
    assert any(not torch.equal(p, lora_params(policy)[n]) for n, p in before.items())


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors(tmp_path):
    policy, tok = make_policy("llama")
    with pytest.raises(TypeError, match="PeftModel"):
        ppo.setup(policy.get_base_model(), tok)
    state = ppo.setup(policy, tok, PPOConfig(max_new_tokens=4))
    prompts = prompts_for("llama", 8)
    with pytest.raises(ValueError, match="non-empty list"):
        ppo.rollout(state, [])
    with pytest.raises(ValueError, match="num_beams=4.*beam search"):
        ppo.rollout(state, prompts, num_beams=4)
    for bad in ({"top_k": 50}, {"top_p": 0.9}, {"repetition_penalty": 1.2}, {"do_sample": False}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ppo.rollout(state, prompts, **bad)
    with pytest.raises(ValueError, match="PPOConfig.temperature"):
        ppo.rollout(state, prompts, temperature=0.5)
    batch = ppo.rollout(state, prompts)

    def nan_at_2(p, r):
        s = torch.zeros(len(r))
        s[2] = float("nan")
        return s
    with pytest.raises(ValueError, match=r"non-finite score \(nan\) for sample 2 \(prompt 'The city council met'"):
        ppo.score(state, batch, nan_at_2)
    with pytest.raises(ValueError, match=r"shape \(7,\) for 8 responses"):
        ppo.score(state, batch, lambda p, r: torch.zeros(len(r) - 1))
    with pytest.raises(ValueError, match="non-finite"):
        ppo.update(state, batch, torch.full((8,), float("inf")))
    policy.save_pretrained(tmp_path / "adapter")
    frozen = PeftModel.from_pretrained(loading.load_causal_lm("tiny:llama"), tmp_path / "adapter")  # not trainable
    with pytest.raises(ValueError, match="is_trainable=True"):
        ppo.setup(frozen, tok)


# ----------------------------------------------------------------------------- config, score shaping
@pytest.mark.parametrize("field,value,match", [
    ("mini_batch_size", 0, "mini_batch_size must be an integer >= 1"), ("batch_size", 0, "batch_size"),
    ("ppo_epochs", 0, "ppo_epochs must be an integer >= 1"), ("kl_coef", float("nan"), "kl_coef must be a finite"),
    ("batch_size", 6, r"batch_size must be a multiple of mini_batch_size x gradient_accumulation_steps \(4 x 1\)"),
    ("min_new_tokens", 20, r"min_new_tokens must be an integer in \[0, max_new_tokens=16\]"),
    ("temperature", 0.0, "temperature must be a finite number > 0"),
    ("lam", 1.5, r"lam must be a finite number in \[0, 1\]"), ("score_norm", "zscore", "score_norm must be one of"),
    ("score_clip", -1.0, "score_clip must be a finite number > 0"),
    ("learning_rate", float("inf"), "learning_rate must be a finite number")])
def test_config_validation_names_the_field(field, value, match):
    with pytest.raises(ValueError, match=f"PPOConfig.{match}"):
        PPOConfig(**{"mini_batch_size": 4, "max_new_tokens": 16, field: value})


def test_running_moments_and_shape_scores_literal():
    moments = ppo.RunningMoments()
    none = torch.zeros(3, dtype=torch.bool)
    # first batch [1, 2, 3]: mean 2, unbiased std 1 -> [-1, 0, 1]
    shaped = ppo.shape_scores(torch.tensor([1.0, 2.0, 3.0]), moments, none, norm="norm", clip=None)
    torch.testing.assert_close(shaped, torch.tensor([-1.0, 0.0, 1.0]))
    # second batch [4, 5] joins: all five seen, mean 3, std sqrt(2.5) = 1.5811; clip 1.0; the truncated one -0.5
    shaped = ppo.shape_scores(torch.tensor([4.0, 5.0]), moments, torch.tensor([False, True]), norm="norm",
                              clip=1.0, truncation_penalty=0.5)
    assert (moments.mean, moments.count) == (3.0, 5) and moments.std == pytest.approx(math.sqrt(2.5))
    torch.testing.assert_close(shaped, torch.tensor([1 / math.sqrt(2.5), 1.0 - 0.5]))
    scaled = ppo.shape_scores(torch.tensor([3.0]), moments, torch.tensor([False]), norm="scale", clip=None)
    torch.testing.assert_close(scaled, torch.tensor([3.0]) / moments.std)   # std over the six: sqrt(2)
    assert moments.std == pytest.approx(math.sqrt(2.0))
    raw = ppo.shape_scores(torch.tensor([7.0]), ppo.RunningMoments(), torch.tensor([True]), norm="none", clip=5.0,
                           truncation_penalty=1.0)
    torch.testing.assert_close(raw, torch.tensor([4.0]))                      # clip 7 -> 5, then the penalty


# ----------------------------------------------------------------------------- an SFT start with marker rows
@pytest.fixture(scope="module")
def sft_folder(tmp_path_factory):
    """A tiny SAWYER SFT adapter: the three markers as new tokens (trainable rows in the adapter), trained LoRA."""
    from sawyer import lora, tokens

    torch.manual_seed(0)
    model, tok = loading.load_causal_lm("tiny:llama"), loading.load_tokenizer("tiny:llama")
    ids = tokens.add_special_tokens(model, tok)
    sft = lora.add_lora(model, lora.lora_config(model, r=8, alpha=16, dropout=0.0, targets="qv",
                                                 trainable_token_indices=tokens.token_indices_for_lora(model, ids)))
    perturb_lora(sft, scale=0.1)
    folder = tmp_path_factory.mktemp("sft") / "adapter"
    tokens.save_adapter(sft, tok, folder)
    return folder


def sft_policy(folder, *, human_bias: float = 0.0):
    """The SFT adapter as a trainable policy plus itself frozen as reference (as notebook 04 builds them).
    ``human_bias`` raises the ``###HUMAN###`` logit (a forward hook on lm_head, seen by every pass)."""
    from sawyer import chat, tokens

    torch.manual_seed(0)
    policy, tok = tokens.load_adapter("tiny:llama", folder, is_trainable=True)
    if human_bias:
        human = tok.convert_tokens_to_ids(chat.HUMAN)

        def bias(module, args, out):
            out = out.clone()
            out[..., human] += human_bias
            return out
        policy.get_base_model().get_output_embeddings().register_forward_hook(bias)
    return policy, tok


def test_sft_start_needs_an_explicit_reference_and_leaves_no_stray_gradients(sft_folder):
    from sawyer import chat

    policy, tok = sft_policy(sft_folder)
    with pytest.raises(ValueError, match="SFT start: it carries trainable token rows.*add_frozen_reference_adapter"):
        ppo.setup(policy, tok, PPOConfig(max_new_tokens=6))
    ref = ppo.add_frozen_reference_adapter(policy, sft_folder)
    cfg = PPOConfig(learning_rate=1e-2, mini_batch_size=4, max_new_tokens=6, gradient_checkpointing=False)
    state = ppo.setup(policy, tok, cfg, ref_adapter=ref, stop_token_ids=chat.stop_token_ids(tok))
    in_optimizer = {id(p) for g in state.optimizer.param_groups for p in g["params"]}
    batch = ppo.rollout(state, prompts_for("llama", 8))
    torch.testing.assert_close(batch.ref_logprobs, batch.logprobs, atol=1e-6, rtol=0)  # step-0 KL is 0
    for _ in range(2):
        ppo.update(state, batch, torch.rand(8))
        batch = ppo.rollout(state, prompts_for("llama", 8))
        stray = [n for n, p in policy.named_parameters()
                 if id(p) not in in_optimizer and (p.requires_grad or p.grad is not None)]
        assert not stray, f"outside the optimiser, these require or hold gradients: {stray[:4]}"
    assert any("trainable_tokens_delta" in n for n, _ in policy.named_parameters()), "the test needs marker rows"


def test_a_response_stops_at_an_invented_human_turn(sft_folder):
    from sawyer import chat

    policy, tok = sft_policy(sft_folder, human_bias=6.0)
    human = tok.convert_tokens_to_ids(chat.HUMAN)
    stops = chat.stop_token_ids(tok)
    assert {tok.convert_tokens_to_ids(m) for m in chat.MARKERS} <= set(stops)
    ref = ppo.add_frozen_reference_adapter(policy, sft_folder)
    state = ppo.setup(policy, tok, PPOConfig(max_new_tokens=12, min_new_tokens=1), ref_adapter=ref,
                      stop_token_ids=stops)
    batch = ppo.rollout(state, [chat.format_prompt(p) for p in prompts_for("llama", 8)])
    ended_at_human = 0
    for b in range(len(batch)):
        ids = batch.response_ids[b][batch.mask[b] > 0].tolist()
        assert human not in ids[:-1], "nothing after an invented ###HUMAN###"
        if ids[-1] == human:
            ended_at_human += 1
            assert not batch.truncated[b]
            assert batch.responses[b] == tok.decode(ids[:-1], skip_special_tokens=True).strip()
        assert not any(m in batch.responses[b] for m in chat.MARKERS)
    assert ended_at_human >= 2, "the test needs responses that invent a human turn"


# ----------------------------------------------------------------------------- rollout = generate's distribution
def make_gpt2_policy():
    """GPT-2 has absolute position embeddings: dropping position_ids under left padding changes its outputs."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = loading.load_tokenizer("tiny:llama")
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id))
    return get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"], fan_in_fan_out=True,
                                           task_type="CAUSAL_LM")), tok


@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5"])
def test_rollout_logprobs_are_the_distribution_generate_sampled_from(kind):
    """Compares with generate()'s processed scores (temperature, min_new_tokens' ban applied): catches a training
    pass that drops min_new_tokens, position_ids under left padding (GPT-2), or the temperature."""
    policy, tok = make_gpt2_policy() if kind == "gpt2" else make_policy(kind, lora_dropout=0.0)
    perturb_lora(policy)
    cfg = PPOConfig(temperature=0.7, min_new_tokens=3, max_new_tokens=8, mini_batch_size=4)
    prompts = prompts_for("t5" if kind == "t5" else "llama", 8)
    prompts[1] = prompts[1] + " and then they all went home after a very long day"  # left padding for the rest
    probe = ppo.rollout(ppo.setup(policy, tok, cfg, base_reference=True), prompts)
    frequent = [t for t, _ in Counter(probe.response_ids[:, :3].flatten().tolist()).most_common(2)]
    state = ppo.setup(policy, tok, cfg, base_reference=True, stop_token_ids=frequent)  # stops worth banning
    captured = {"scores": []}
    generate, sample = policy.generate, ppo.sample_causal

    def generate_with_scores(**kwargs):  # seq2seq rollouts sample with generate()
        out = generate(**kwargs, output_scores=True, return_dict_in_generate=True)
        captured["scores"] = out.scores
        return out.sequences
    policy.generate = generate_with_scores
    ppo.sample_causal = lambda *a, **k: sample(*a, **k, scores=captured["scores"])  # causal ones with our loop
    try:
        batch = ppo.rollout(state, prompts)
    finally:
        ppo.sample_causal = sample
    assert len(captured["scores"]) == batch.response_ids.shape[1]
    scores = torch.stack(captured["scores"], 1)                                 # (B, T, V), processed
    expected = torch.log_softmax(scores.float(), -1).gather(-1, batch.response_ids[..., None]).squeeze(-1)
    assert (batch.prompt_mask == 0).any(), "the test needs left padding"
    torch.testing.assert_close(batch.logprobs, expected * batch.mask, atol=2e-5, rtol=0)


def test_draw_inverts_the_cumulative_distribution_and_never_draws_a_zero():
    probs = torch.tensor([[0.5, 0.0, 0.2, 0.3], [0.0, 0.0, 1.0, 0.0]])
    torch.manual_seed(3)
    u = torch.rand(2, 1)
    torch.manual_seed(3)
    got = ppo_models.draw(probs)
    expected = [int((probs[b].cumsum(0) > u[b]).nonzero()[0]) for b in range(2)]  # first entry above the draw
    assert got.tolist() == expected and got[1] == 2
    draws = ppo_models.draw(probs[:1].expand(40000, 4))
    freq = torch.bincount(draws, minlength=4) / 40000
    assert freq[1] == 0, "a token of probability 0 was drawn"
    torch.testing.assert_close(freq, probs[0], atol=0.01, rtol=0)  # 4+ standard errors at 40k draws


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_our_sampling_loop_samples_what_generate_would(kind):
    """First step (same prompts, no draw yet): our processed logits equal generate()'s scores (temperature,
    min_new_tokens' ban, left padding); then the loop's mechanics: stops end rows, pad follows, the KV-cached
    steps see the tokens they drew (the training pass's log-probs agree with the loop's scores)."""
    policy, tok = make_gpt2_policy() if kind == "gpt2" else make_policy(kind, lora_dropout=0.0)
    perturb_lora(policy)
    policy.eval()  # a freshly built GPT-2 is in train mode: its dropout would make the two passes differ
    prompts = prompts_for("llama", 8)
    prompts[1] = prompts[1] + " and then they all went home after a very long day"
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    stops = (tok.eos_token_id, 5, 9)
    with torch.no_grad():
        out = policy.generate(**enc, do_sample=True, top_k=0, top_p=1.0, temperature=0.7, min_new_tokens=2,
                              max_new_tokens=3, eos_token_id=list(stops), pad_token_id=tok.pad_token_id,
                              output_scores=True, return_dict_in_generate=True)
    scores = []
    ids = ppo_models.sample_causal(policy, enc["input_ids"], enc["attention_mask"], temperature=0.7, min_new_tokens=2,
                                   max_new_tokens=12, stop_token_ids=stops, pad_token_id=tok.pad_token_id,
                                   scores=scores)
    torch.testing.assert_close(scores[0], out.scores[0].float(), atol=1e-5, rtol=1e-5)
    assert torch.isinf(scores[1][:, list(stops)]).all() and not torch.isinf(scores[2]).any()
    assert not torch.isin(ids[:, :2], torch.tensor(stops)).any()
    is_stop = torch.isin(ids, torch.tensor(stops))
    for b in range(len(prompts)):
        if is_stop[b].any():
            first = int(is_stop[b].float().argmax())
            assert (ids[b, first + 1:] == tok.pad_token_id).all(), "after a stop token, padding"


def test_fast_cpu_linears_swap_in_onednn_for_sampling_and_put_everything_back(monkeypatch):
    policy, tok = make_policy("llama", lora_dropout=0.0)
    ppo_models.contiguous_lm_head_input(policy)
    head = policy.get_output_embeddings()
    linears = [m for m in policy.modules() if type(m) is torch.nn.Linear]
    x = torch.randn(3, 1, head.in_features)
    with torch.no_grad():
        before = [head(x), policy(**tok(["a cat sat"], return_tensors="pt")).logits]
    monkeypatch.setattr(ppo_models, "_ONEDNN", None)  # probe afresh: it must not move the global RNG (a seeded
    rng = torch.random.get_rng_state()                # rollout would sample differently the first time only)
    assert ppo_models._onednn_works(), "this torch (2.13 CPU) has oneDNN's linear: the fast path must be taken"
    assert torch.equal(torch.random.get_rng_state(), rng)
    with ppo_models.fast_cpu_linears(policy), torch.no_grad():
        assert all(m.forward.__func__ is ppo_models._onednn_linear for m in linears)
        during = [head(x), policy(**tok(["a cat sat"], return_tensors="pt")).logits]
    for a, b in zip(before, during):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert all("forward" not in m.__dict__ for m in linears), "the class forward is back everywhere"
    assert head._forward_pre_hooks, "the head keeps its contiguous-input hook"
    monkeypatch.setattr(ppo_models, "_ONEDNN", False)  # a torch without the op: nothing is swapped
    with ppo_models.fast_cpu_linears(policy):
        assert all("forward" not in m.__dict__ for m in linears)


def test_fast_cpu_linears_train_with_the_gradients_of_f_linear():
    """PPO's training pass runs inside the block too: the LoRA gradients (and those of a bias and an input)
    must be the ones the standard linear gives, with a frozen base weight saving no input for its backward."""
    lin = torch.nn.Linear(16, 24)
    lin.weight.requires_grad_(False)  # a frozen base weight; its bias and the input still learn
    x = torch.randn(2, 5, 16, requires_grad=True)
    g = torch.randn(2, 5, 24)
    (lin(x) * g).sum().backward()
    expected = x.grad.clone(), lin.bias.grad.clone()
    x.grad = lin.bias.grad = None
    with ppo_models.fast_cpu_linears(lin):
        out = lin(x)
        assert out.grad_fn.name().endswith("_OneDNNLinearBackward")
        (out * g).sum().backward()
    torch.testing.assert_close((x.grad, lin.bias.grad), expected, atol=1e-5, rtol=1e-5)

    policy, tok = make_policy("llama", lora_dropout=0.0)
    batch = tok(["a cat sat on the mat", "the dog"], return_tensors="pt", padding=True)

    def lora_grads():
        policy.zero_grad(set_to_none=True)
        policy(**batch).logits.float().logsumexp(-1).mean().backward()
        return {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}

    plain = lora_grads()
    with ppo_models.fast_cpu_linears(policy):
        fast = lora_grads()
    assert plain and fast.keys() == plain.keys() and any("lora_A" in n for n in plain)
    for n in plain:
        torch.testing.assert_close(fast[n], plain[n], atol=1e-5, rtol=1e-4, msg=n)


def test_values_read_the_state_that_predicts_each_token():
    policy, tok = make_policy("llama", lora_dropout=0.0)
    state = ppo.setup(policy, tok, PPOConfig(max_new_tokens=6, mini_batch_size=4))
    with torch.no_grad():
        state.value_head.weight.normal_()
    batch = ppo.rollout(state, prompts_for("llama", 8))
    ids = torch.cat([batch.prompt_ids, batch.response_ids], 1)
    attention = torch.cat([batch.prompt_mask, torch.ones_like(batch.response_ids)], 1)
    with torch.no_grad():
        hidden = policy(input_ids=ids, attention_mask=attention, position_ids=(attention.cumsum(-1) - 1).clamp(min=0),
                        output_hidden_states=True).hidden_states[-1]
        p = batch.prompt_ids.shape[1]
        expected = state.value_head(hidden[:, p - 1:-1]).squeeze(-1)  # the state after prompt + response[:t]
    torch.testing.assert_close(batch.values, expected * batch.mask, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- the update's gradients
def record_gradients(state):
    """Wrap the optimiser's step so each call records the gradients it is about to apply."""
    params = [p for g in state.optimizer.param_groups for p in g["params"]]
    steps, step = [], state.optimizer.step

    def recording_step(*args, **kwargs):
        steps.append([p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params])
        return step(*args, **kwargs)
    state.optimizer.step = recording_step
    return steps


def test_gradient_accumulation_equals_one_larger_minibatch():
    """2 minibatches of 2, accumulated, give the gradient of one minibatch of 4 (equal lengths: min = max)."""
    cfg = dict(learning_rate=1e-2, ppo_epochs=1, min_new_tokens=5, max_new_tokens=5, gradient_checkpointing=False,
               max_grad_norm=None)
    states = []
    for mb, ga in ((2, 2), (4, 1)):
        policy, tok = make_policy("llama", lora_dropout=0.0)
        states.append(ppo.setup(policy, tok, PPOConfig(mini_batch_size=mb, gradient_accumulation_steps=ga, **cfg)))
    batch = ppo.rollout(states[0], prompts_for("llama", 8))
    assert batch.mask.eq(1).all()
    grads = [record_gradients(s) for s in states]
    scores = torch.tensor([0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6])
    for s in states:
        ppo.update(s, batch, scores)
    assert len(grads[0]) == len(grads[1]) == 2, "8 samples / (2 x 2) and 8 / (4 x 1): two optimiser steps each"
    for accumulated, single in zip(grads[0], grads[1]):
        for a, b in zip(accumulated, single):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_update_starts_from_the_rollouts_policy_pass_and_gets_the_same_gradients():
    """One minibatch = the whole batch, no checkpointing: the rollout's policy pass keeps its graph and update()'s
    first minibatch backpropagates through it instead of running the same forward again (one forward fewer)."""
    cfg = PPOConfig(learning_rate=1e-2, ppo_epochs=2, mini_batch_size=8, min_new_tokens=2, max_new_tokens=6,
                    gradient_checkpointing=False, temperature=0.8)
    states, forwards = [], []
    for _ in range(2):
        policy, tok = make_policy("llama", lora_dropout=0.0)
        states.append(ppo.setup(policy, tok, cfg))
        calls = []
        policy.get_base_model().model.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        forwards.append(calls)
    batch = ppo.rollout(states[0], prompts_for("llama", 8))
    assert batch.graph is not None and batch.graph[0].requires_grad
    assert not batch.logprobs.requires_grad and not batch.values.requires_grad
    recomputed = dataclasses.replace(batch, graph=None)  # the same rollout, without the graph
    grads = [record_gradients(s) for s in states]
    scores = torch.tensor([0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6])
    before = [len(f) for f in forwards]
    stats = [ppo.update(s, b, scores) for s, b in zip(states, (batch, recomputed))]
    assert [len(f) - n for f, n in zip(forwards, before)] == [1, 2], "reuse saves exactly the first forward"
    assert batch.graph is None, "the graph is used once"
    assert stats[0]["policy/first_minibatch_max_abs_logratio"] == 0.0
    for reused, again in zip(*grads):
        for a, b in zip(reused, again):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    with torch.no_grad():
        assert ppo.rollout(states[0], prompts_for("llama", 8)).graph is None, "no graph without gradients"
    small = ppo.setup(*make_policy("llama", lora_dropout=0.0), dataclasses.replace(cfg, mini_batch_size=4))
    assert ppo.rollout(small, prompts_for("llama", 8)).graph is None, "two minibatches: nothing to reuse"


def test_fp16_policy_gradients_match_fp32():
    """An fp16 policy's PPO step, with fp32 LoRA masters and loss scaling, gives the fp32 gradients within a
    relative error of 2e-2 (measured ~3e-3 on CPU in torch 2.13); the loss scale grows past 1."""
    import copy

    states = []
    base = loading.load_causal_lm("tiny:llama")
    for dtype in (torch.float32, torch.float16):
        torch.manual_seed(0)
        policy = get_peft_model(copy.deepcopy(base).to(dtype), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                                         target_modules=["q_proj", "v_proj"]))
        perturb_lora(policy, scale=0.1)
        cfg = PPOConfig(learning_rate=1e-3, ppo_epochs=1, max_new_tokens=6, gradient_checkpointing=False,
                        max_grad_norm=1.0)  # clipping must see unscaled gradients
        states.append(ppo.setup(policy, loading.load_tokenizer("tiny:llama"), cfg, base_reference=True))
    fp32, fp16 = states
    assert not fp32.scaler.is_enabled() and fp16.scaler.is_enabled()
    assert all(p.dtype == torch.float32 for g in fp16.optimizer.param_groups for p in g["params"])
    batch = ppo.rollout(fp32, prompts_for("llama", 8))
    grads = [record_gradients(s) for s in states]
    for s in states:
        ppo.update(s, batch, torch.tensor([0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6]))
    g32, g16 = (torch.cat([g.flatten() for g in gs[0]]) for gs in grads)
    rel = ((g16 - g32).norm() / g32.norm()).item()
    print(f"fp16 vs fp32 LoRA/value-head gradient relative error: {rel:.2e}")
    assert rel < 2e-2 and g32.norm() > 0
    assert fp16.scaler.get_scale() > 1


def test_a_model_that_ignores_logits_to_keep_is_an_error_not_a_silent_misread():
    policy, tok = make_policy("llama")

    class AllPositions(torch.nn.Module):
        """A reference that computes logits at every position (as a model without logits_to_keep would)."""
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, logits_to_keep=None, **kwargs):
            return self.model(**kwargs)
    state = ppo.setup(policy, tok, PPOConfig(max_new_tokens=4), ref_model=AllPositions(loading.load_causal_lm(
        "tiny:llama")))
    with pytest.raises(RuntimeError, match=r"AllPositions returned logits of shape \(8, \d+, \d+\); expected"):
        ppo.rollout(state, prompts_for("llama", 8))


def test_presets_recompute_activations_only_where_memory_is_short():
    """Gradient checkpointing costs ~29% of the training pass: on for the T4's 16 GB, off elsewhere."""
    from sawyer.presets import get_preset

    for name in ("tiny", "cpu", "a100", "t4"):
        preset = get_preset(name)
        for stage in (preset.summary.ppo, preset.ppo.ppo):
            assert stage.gradient_checkpointing is (name == "t4"), (name, stage)
