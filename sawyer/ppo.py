"""Compact PPO for RLHF: causal and seq2seq policies, any text-level reward (see DESIGN.md).

The classic recipe (Ziegler et al. 2019; Stiennon et al. 2020; Huang et al. 2024, "The N implementation
details of RLHF with PPO"; PPO itself: Schulman et al. 2017). Notebook 04 runs the loop in the open::

    state = ppo.setup(policy, tokenizer, PPOConfig(), ref_adapter=ref)  # policy: a PeftModel (LoRA)
    for prompts in batches:
        batch = ppo.rollout(state, prompts)          # 1. sample; 3. log-probs, reference log-probs, values
        scores = ppo.score(state, batch, reward_fn)  # 2. reward_fn(prompts, responses) -> Tensor[B]
        stats = ppo.update(state, batch, scores)     # 4. shaped score + KL penalty 5. GAE 6. clipped update 7. stats

Checkpoints (with the state a bit-exact resume needs) and the ``train`` loop live in ``sawyer.checkpoints``; the
pure math in ``sawyer.ppo_math`` (GAE, the clipped losses, score shaping, ...: importable from here too), the
PEFT/transformers plumbing in ``sawyer.ppo_models``.

Reference model: the policy with its LoRA adapter switched off is the reference only for a *fresh* adapter.
When PPO starts from an SFT adapter the reference must be that SFT model: load the SFT adapter a second
time as a frozen adapter (``add_frozen_reference_adapter``) and pass ``ref_adapter=``; or pass ``ref_model=``.
``setup`` refuses an SFT start without one (``base_reference=True`` overrides, if the base really is meant).

Logged metrics (``update`` returns them; one JSON line per step in ``run_dir/ppo_log.jsonl``):

- ``objective/score``: mean raw reward-model score of the batch (``objective/score_std``: its spread);
  ``objective/shaped_score``: the mean score PPO optimised (normalised, clipped, truncation penalty).
- ``objective/kl``: mean over responses of the summed per-token ``logp - ref_logp`` (nats per response).
- ``objective/kl_coef``: beta used for this step's penalty.
- ``objective/entropy``: mean over responses of the summed ``-logp`` of the sampled tokens (a sample estimate).
- ``policy/approx_kl``: ``0.5 * mean((logp_new - logp_old)^2)`` over updates; how far PPO moved from the rollout.
- ``policy/clipfrac``: fraction of tokens whose ratio was clipped; above ~0.2, steps are too big.
- ``policy/first_minibatch_max_abs_logratio``: should be ~0: rollout and training pass agree.
- ``loss/policy``, ``loss/value``: the clipped losses, averaged over minibatches. ``val/clipfrac``: value clips.
- ``val/explained_variance``: 1 - Var(returns - values) / Var(returns); near 1 when the value head predicts well.
- ``response/length``: mean response tokens (stop token included); ``response/truncated``: the fraction that
  reached ``max_new_tokens`` without a stop token.
- ``time/generate``, ``time/logprobs``, ``time/score``, ``time/train``: seconds spent in each part of the step.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from sawyer import validate
from sawyer.ppo_models import (NEUTRAL_SAMPLING, add_frozen_reference_adapter, check_generation_kwargs,  # noqa: F401
                               computes_in_fp16, contiguous_lm_head_input, fast_cpu_linears, freeze_outside_optimizer,
                               one_code_path, sample_causal, sft_start_reason)
from sawyer.ppo_math import (AdaptiveKLController, FixedKLController, RunningMoments, gae,  # noqa: F401
                             gather_logprobs, kl_penalty_rewards, masked_mean, masked_var, masked_whiten,
                             policy_loss, shape_scores, value_loss)


@dataclass
class PPOConfig:
    """PPO hyperparameters. Defaults are the SAWYER workshop's (Part 4 of DESIGN.md) plus the score shaping below.

    learning_rate: Adam step size for LoRA + value head. 1.41e-5 in the workshop; LoRA tolerates 1e-5 to 1e-4.
    batch_size: prompts per PPO step (rollout size). Typically 8 to 64.
    mini_batch_size: samples per gradient step inside an epoch; ``batch_size`` must divide by it.
    gradient_accumulation_steps: minibatches whose gradients add up before one optimiser step.
    ppo_epochs: passes over each rollout. 2 in the workshop, 4 in TRL's classic default; more reuses data
        harder and drifts further from the sampling policy (watch ``policy/clipfrac``).
    kl_coef: initial beta of the per-token penalty ``-beta * (logp - ref_logp)``. 0.2 in the workshop; 0.01-0.2
        is typical for unit-scale scores (the paper's rewards were normalised, as ``score_norm`` does here).
    adaptive_kl: adapt beta towards ``kl_target`` (Ziegler et al. 2019) instead of keeping it fixed. Honest
        caveat: beta moves by at most a factor ``1 +/- 0.2 * batch_size / kl_horizon`` per step, i.e. 0.016%
        at batch 8; over the original's 450 steps that is 0.186-0.215 from 0.2. At workshop scale it is
        effectively a fixed beta with a slow drift; it steers only over ~10^4-10^5 samples.
    kl_target: the KL (nats per sequence) the adaptive controller aims for. 6 in the workshop.
    kl_horizon: samples over which the controller moves beta by its (clipped) proportional error. 10000.
    gamma: discount. 1.0: a response is one episode and only its end is rewarded.
    lam: GAE lambda. 0.95 trades variance (1.0) for bias (0.0).
    cliprange: PPO's epsilon for the probability ratio. Usually 0.1 to 0.3.
    cliprange_value: the same clip for the value function's update: a value moves at most this far per rollout.
    vf_coef: weight of the value loss in the total loss. 0.1.
    max_grad_norm: gradient clipping threshold (None: off).
    temperature: sampling temperature; the training pass divides logits by the same value, so the
        log-probs it computes are the ones of the distribution that sampled.
    min_new_tokens / max_new_tokens: response length range at rollout. Keep the minimum small (stop tokens are
        banned that long, forcing text the model would have ended); the original's maximum was 128-256.
    logprob_chunk_size: samples per chunk when gathering log-probs, so the full-vocabulary fp32
        log-softmax never exists for the whole batch at once.
    gradient_checkpointing: recompute activations in the training pass (memory for compute). The profile of the
        bench's anchor shape (Llama hidden 512, 4 layers, batch 8, 64 + 64 tokens, CPU) puts the recomputation
        at ~29% of the training phase for ~114 MiB of activations saved, so the presets switch it off where
        memory allows (tiny, cpu, a100) and keep it on for the T4's 16 GB (t4). Off, with
        ``mini_batch_size == batch_size``, the rollout's policy pass also serves as the first training forward
        (one forward fewer per step). Needs memory that grows with batch x sequence x layers; turn it on when
        the training pass runs out of memory.
    whiten_rewards: whiten the per-token rewards before GAE (off in the classic recipe).
    score_norm: "norm" (default): ``(score - running mean) / running std`` over every score seen so far
        (TRL's ``use_score_norm``); "scale": divide by the running std only; "none": raw scores. Why on by default:
        raw reward-model logits (~5.7 in the original, spread ~3.5) sit far from the value head's initial 0, and
        with ``cliprange_value`` 0.2 per rollout the value head needs ~30 steps to reach them, so explained
        variance stays ~0 for a short run. Unit-scale scores start where the head starts (so its zero bias is the
        right initial bias) and give beta the scale it was tuned for (Ziegler et al. normalise the reward model
        to mean 0, std 1 with a fixed gain and bias; we use running statistics, which need no extra pass).
    score_clip: clip the shaped score to ``+/- score_clip`` (None: off). 3.0 trims only outliers of unit-scale
        scores (TRL's ``score_clip``; Huang et al.'s reward clipping).
    truncation_penalty: subtracted from the shaped score of a response that reached ``max_new_tokens`` without a
        stop token, in shaped-score units (1.0 = one standard deviation with ``score_norm="norm"``; 0: off).
        Huang et al.'s "EOS trick" replaces such scores by a constant -1; a penalty keeps the reward model's
        ordering. It counters the reward model's length bias: rambling until cut off must not pay.
    seed: seeds sampling, minibatch order and the value head's initialisation.
    """

    learning_rate: float = 1.41e-5
    batch_size: int = 8
    mini_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    ppo_epochs: int = 2
    kl_coef: float = 0.2
    adaptive_kl: bool = True
    kl_target: float = 6.0
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    max_grad_norm: float | None = 1.0
    temperature: float = 1.0
    min_new_tokens: int = 0
    max_new_tokens: int = 128
    logprob_chunk_size: int = 4
    gradient_checkpointing: bool = True
    whiten_rewards: bool = False
    score_norm: str = "norm"
    score_clip: float | None = 3.0
    truncation_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self):  # a bad value fails here (and on dataclasses.replace), naming the field
        validate.integer(self, "batch_size", "mini_batch_size", "gradient_accumulation_steps", "ppo_epochs",
                         "kl_horizon", "max_new_tokens", "logprob_chunk_size")
        validate.integer(self, "min_new_tokens", "seed", low=0)
        validate.number(self, "learning_rate", "kl_target", "cliprange", "cliprange_value", "temperature", low=0,
                        low_open=True)
        validate.number(self, "kl_coef", "vf_coef", "truncation_penalty", low=0)
        validate.number(self, "gamma", "lam", low=0, high=1)
        for name in ("max_grad_norm", "score_clip"):
            if getattr(self, name) is not None:
                validate.number(self, name, low=0, low_open=True)
        validate.choice(self, "score_norm", ("norm", "scale", "none"))
        validate.flag(self, "adaptive_kl", "gradient_checkpointing", "whiten_rewards")
        if self.min_new_tokens > self.max_new_tokens:
            raise validate.ConfigError(f"PPOConfig.min_new_tokens must be an integer in [0, max_new_tokens="
                                       f"{self.max_new_tokens}], got {self.min_new_tokens}")
        if self.batch_size % (self.mini_batch_size * self.gradient_accumulation_steps):
            raise validate.ConfigError(f"PPOConfig.batch_size must be a multiple of mini_batch_size x gradient_"
                                       f"accumulation_steps ({self.mini_batch_size} x "
                                       f"{self.gradient_accumulation_steps}), got {self.batch_size}")


# ============================================================================ state and set-up
@dataclass
class PPOState:
    """Everything a PPO run carries between steps: the models, the optimiser, the step and its statistics."""

    policy: Any                       # a peft PeftModel; only its trainable LoRA adapter changes
    tokenizer: Any
    value_head: nn.Linear             # hidden state -> value, fp32
    optimizer: torch.optim.Optimizer  # LoRA + value-head parameters only (fp32 masters)
    kl_ctl: AdaptiveKLController | FixedKLController
    config: PPOConfig
    adapter: str                      # name of the trainable adapter
    is_seq2seq: bool
    stop_token_ids: tuple[int, ...]   # EOS and any extra stop tokens (e.g. ###STOP###, ###HUMAN###)
    ref_adapter: str | None = None    # a frozen second adapter used as reference (e.g. the SFT adapter)
    ref_model: Any = None             # an explicit reference model
    run_dir: Path | None = None
    step: int = 0
    score_stats: RunningMoments = field(default_factory=RunningMoments)  # for score_norm
    scaler: Any = None                # torch.amp.GradScaler, enabled when the policy computes in fp16

    @property
    def device(self) -> torch.device:
        return self.value_head.weight.device


def setup(policy, tokenizer, config: PPOConfig | None = None, *, ref_model=None, ref_adapter: str | None = None,
          base_reference: bool = False, run_dir: str | Path | None = None,
          stop_token_ids: tuple[int, ...] | list[int] = ()) -> PPOState:
    """Check the policy, attach a value head and build the optimiser (and, for fp16, the loss scaler).

    ``policy``: a ``peft.PeftModel`` whose active adapter is trainable LoRA (for 4-bit, call
    ``loading.prepare_for_training`` before attaching LoRA). Everything that is not that adapter's LoRA is
    frozen here; LoRA weights are kept in fp32 (master weights) whatever the policy computes in.
    Reference: ``ref_adapter`` -> a frozen adapter in the same PeftModel; ``ref_model`` -> an explicit model
    sharing the tokenizer; neither -> the policy with its adapter disabled, allowed only for a fresh adapter
    (or with ``base_reference=True``). ``stop_token_ids`` end a response in addition to EOS (pass
    ``chat.stop_token_ids(tokenizer)``: every marker that begins a new turn). Dropout is switched off in the
    policy (see ``ppo_models.one_code_path``), and python, numpy and torch are seeded with ``config.seed``.
    """
    from peft import PeftModel
    from transformers import set_seed

    config = config or PPOConfig()
    if not isinstance(policy, PeftModel):
        raise TypeError(f"setup() needs a peft.PeftModel (LoRA attached), got {type(policy).__name__}; "
                        "wrap it with peft.get_peft_model(model, LoraConfig(...)) or load an SFT adapter with "
                        "PeftModel.from_pretrained(model, path, is_trainable=True)")
    adapter = policy.active_adapter
    if ref_adapter is not None and (ref_adapter == adapter or ref_adapter not in policy.peft_config):
        raise ValueError(f"ref_adapter={ref_adapter!r} must name a second adapter of the policy (it has "
                         f"{list(policy.peft_config)}, trainable: {adapter!r}); see add_frozen_reference_adapter")
    explicit = ref_model is not None or ref_adapter is not None or base_reference
    if not explicit and (why := sft_start_reason(policy, adapter)):
        raise ValueError(f"no reference given and the policy's adapter {adapter!r} is an SFT start: {why}. With the "
                         "adapter disabled the reference would be the base model, not the SFT model (step-0 KL of "
                         "several nats instead of 0). Pass ref_adapter=ppo.add_frozen_reference_adapter(policy, "
                         "sft_adapter_folder) or ref_model=..., or base_reference=True if the base is meant")
    set_seed(config.seed)

    # only the trainable adapter's LoRA weights train, in fp32; everything else (base, reference) is frozen
    own_lora = re.compile(rf"\.lora_\w+\.{re.escape(adapter)}(\.|$)")
    lora = [p for n, p in policy.named_parameters() if own_lora.search(n) and p.requires_grad]
    if not lora:
        raise ValueError(f"adapter {adapter!r} has no trainable LoRA parameters: load it with is_trainable=True "
                         "(PeftModel.from_pretrained(model, path, is_trainable=True))")
    for name, p in policy.named_parameters():
        if p.requires_grad and not own_lora.search(name):
            p.requires_grad_(False)
    for p in lora:
        p.data = p.data.float()
    one_code_path(policy)
    base = policy.get_base_model()
    if config.gradient_checkpointing and base.supports_gradient_checkpointing:
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if ref_model is not None:
        one_code_path(ref_model.eval())
    for model in (policy, ref_model):  # logits_to_keep slices the hidden states: copy them once, so the
        if model is not None:          # vocabulary projection is one plain matmul, not a batched one with grads
            contiguous_lm_head_input(model)

    # value head on the last hidden state (the decoder's for seq2seq), fp32. A seeded, small normal init
    # (std 0.01 / sqrt(d)) and a zero bias start the values near 0: the mean of normalised scores (score_norm).
    hidden = policy.config.get_text_config().hidden_size
    device = next(policy.parameters()).device
    value_head = nn.Linear(hidden, 1, dtype=torch.float32)
    g = torch.Generator().manual_seed(config.seed)
    with torch.no_grad():
        value_head.weight.copy_(torch.randn(value_head.weight.shape, generator=g) * 0.01 / math.sqrt(hidden))
        value_head.bias.zero_()
    value_head.to(device)

    optimizer = torch.optim.Adam(lora + list(value_head.parameters()), lr=config.learning_rate)
    kl_ctl = (AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon) if config.adaptive_kl
              else FixedKLController(config.kl_coef))
    eos = policy.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    stops = tuple(dict.fromkeys([tokenizer.eos_token_id, *eos, *stop_token_ids]))
    if run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    # fp16 compute: loss scaling keeps small gradients from flushing to zero (torch.amp; fp32 masters above)
    scaler = torch.amp.GradScaler(device.type, enabled=computes_in_fp16(policy))
    return PPOState(policy=policy, tokenizer=tokenizer, value_head=value_head, optimizer=optimizer, kl_ctl=kl_ctl,
                    config=config, adapter=adapter, is_seq2seq=bool(policy.config.is_encoder_decoder),
                    stop_token_ids=stops, ref_adapter=ref_adapter, ref_model=ref_model,
                    run_dir=None if run_dir is None else Path(run_dir), scaler=scaler)


# ============================================================================ 1. rollout (+ 3. log-probs)
@dataclass
class Rollout:
    """One batch of sampled responses and everything PPO needs about them. Token tensors are (B, P) or (B, T)."""

    prompts: list[str]
    responses: list[str]              # decoded, without special tokens and without the stop token
    prompt_ids: torch.Tensor          # (B, P) left-padded (causal) or right-padded (seq2seq)
    prompt_mask: torch.Tensor         # (B, P)
    response_ids: torch.Tensor        # (B, T) sampled tokens
    mask: torch.Tensor                # (B, T) 1 up to and including the first stop token, float
    logprobs: torch.Tensor            # (B, T) fp32, policy at rollout time
    ref_logprobs: torch.Tensor        # (B, T) fp32, reference
    values: torch.Tensor              # (B, T) fp32, value head
    truncated: torch.Tensor           # (B,) bool: reached max_new_tokens without a stop token
    timings: dict[str, float] = field(default_factory=dict)
    # the policy pass with its autograd graph, (log-probs, values) each (B, T), when update() can start from it
    # (see rollout); update() consumes it in its first minibatch and sets it back to None
    graph: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.prompts)


def _model_inputs(state: PPOState, prompt_ids, prompt_mask, response_ids) -> dict:
    if state.is_seq2seq:  # prompt -> encoder; decoder reads [start] + response[:-1]
        start = torch.full_like(response_ids[:, :1], state.policy.config.decoder_start_token_id)
        return {"input_ids": prompt_ids, "attention_mask": prompt_mask,
                "decoder_input_ids": torch.cat([start, response_ids[:, :-1]], 1)}
    ids = torch.cat([prompt_ids, response_ids], 1)                               # (B, P + T)
    attention = torch.cat([prompt_mask, torch.ones_like(response_ids)], 1)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)  # left padding: the first real token is position 0
    return {"input_ids": ids, "attention_mask": attention, "position_ids": positions,
            "logits_to_keep": response_ids.shape[1] + 1}  # lm_head only on the positions predicting the response


def _forward(state: PPOState, model, prompt_ids, prompt_mask, response_ids, *, with_values: bool):
    """Log-probs of ``response_ids`` under ``model`` (and values when ``with_values``), each (b, T) fp32.

    Used by the rollout's no-grad passes and by the training pass, so both compute the same numbers.
    """
    out = model(**_model_inputs(state, prompt_ids, prompt_mask, response_ids), output_hidden_states=with_values,
                use_cache=False)
    n = response_ids.shape[1] + (0 if state.is_seq2seq else 1)
    if out.logits.shape[:2] != (response_ids.shape[0], n):  # e.g. a model that ignores logits_to_keep
        raise RuntimeError(f"{type(model).__name__} returned logits of shape {tuple(out.logits.shape)}; expected "
                           f"({response_ids.shape[0]}, {n}, vocab): the positions that predict the response")
    logits = out.logits if state.is_seq2seq else out.logits[:, :-1]             # (b, T, V)
    cfg = state.config
    logprobs = gather_logprobs(logits, response_ids, cfg.logprob_chunk_size, temperature=cfg.temperature,
                               suppress_ids=state.stop_token_ids, suppress_until=cfg.min_new_tokens)
    if not with_values:
        return logprobs, None
    if state.is_seq2seq:  # decoder state t has read [start] + response[:t]: it predicts token t
        hidden = out.decoder_hidden_states[-1]                                   # (b, T, H)
    else:  # state at prompt end + t - 1 has read the prompt and response[:t]: it predicts token t
        hidden = out.hidden_states[-1][:, prompt_ids.shape[1] - 1:-1]            # (b, T, H)
    return logprobs, state.value_head(hidden.float()).squeeze(-1)                # (b, T), (b, T)


def _fast_linears(state: PPOState) -> ExitStack:
    """``fast_cpu_linears`` on the policy and, when there is one, the explicit reference model."""
    stack = ExitStack()
    for model in (state.policy, state.ref_model):
        if model is not None:
            stack.enter_context(fast_cpu_linears(model))
    return stack


@contextmanager
def _reference(state: PPOState):
    """The reference model for one pass: explicit model, frozen reference adapter, or the adapter disabled."""
    if state.ref_model is not None:
        yield state.ref_model
        return
    try:
        if state.ref_adapter is not None:
            state.policy.set_adapter(state.ref_adapter, inference_mode=True)
            yield state.policy
        else:
            with state.policy.disable_adapter():
                yield state.policy
    finally:  # switch back, and undo the requires_grad that PEFT turns on again
        if state.ref_adapter is not None:
            state.policy.set_adapter(state.adapter)
        freeze_outside_optimizer(state.policy, state.optimizer)


def _excerpt(text: str, n: int = 80) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


def rollout(state: PPOState, prompts: list[str], **generation_kwargs) -> Rollout:
    """1. Sample one response per prompt (batched), then 3. score the tokens: log-probs under the policy and
    the reference, and values, in passes of ``mini_batch_size`` samples.

    Sampling is plain ``softmax(logits / temperature)`` with the KV cache: ``ppo_models.sample_causal`` for a
    causal policy (the distribution ``generate`` would sample, drawn faster), ``generate`` for seq2seq. Anything
    else (beam search, top-k, top-p, repetition penalties) is refused: the training pass could not reproduce it.
    The reference pass runs without gradients; the policy pass too, except when one minibatch is the whole batch
    and activations are kept (no gradient checkpointing): then ``update`` starts from its graph (``graph``).
    """
    cfg, tok, policy = state.config, state.tokenizer, state.policy
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"rollout() needs a non-empty list of prompt strings, got {prompts!r}")
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError("rollout(): every prompt must be a string")
    check_generation_kwargs(generation_kwargs)
    enc = tok(list(prompts), return_tensors="pt", padding=True,
              padding_side="right" if state.is_seq2seq else "left").to(state.device)
    if (enc["attention_mask"].sum(1) == 0).any():
        i = int((enc["attention_mask"].sum(1) == 0).nonzero()[0])
        raise ValueError(f"prompt {i} ({_excerpt(prompts[i])}) has no tokens")

    # 1. sample: one batched generate, stop tokens (EOS, markers) end a response
    t0 = time.perf_counter()
    policy.eval()
    sampling = dict(NEUTRAL_SAMPLING, temperature=cfg.temperature, min_new_tokens=cfg.min_new_tokens,
                    max_new_tokens=cfg.max_new_tokens, eos_token_id=list(state.stop_token_ids),
                    pad_token_id=tok.pad_token_id)
    if state.is_seq2seq:
        with torch.no_grad():
            sequences = policy.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **sampling)
        response_ids = sequences[:, 1:]                                          # (B, T) after the start token
    else:  # the same distribution, sampled by our own short loop (see ppo_models.sample_causal: faster)
        response_ids = sample_causal(policy, enc["input_ids"], enc["attention_mask"], temperature=cfg.temperature,
                                     min_new_tokens=cfg.min_new_tokens, max_new_tokens=cfg.max_new_tokens,
                                     stop_token_ids=state.stop_token_ids, pad_token_id=tok.pad_token_id)
    is_stop = torch.isin(response_ids, torch.tensor(state.stop_token_ids, device=response_ids.device))
    mask = ((is_stop.cumsum(1) - is_stop.long()) == 0).float()  # keep tokens up to and including the first stop
    t1 = time.perf_counter()

    # 3. log-probs (policy, reference) and values, batched. When one minibatch is the whole batch and the
    # training pass keeps its activations (no gradient checkpointing), update()'s first forward would recompute
    # exactly this policy pass: it runs with gradients here instead, and update() starts from its graph.
    keep_graph = (torch.is_grad_enabled() and cfg.mini_batch_size >= len(prompts)
                  and not getattr(policy.get_base_model(), "is_activation_checkpointing", False))
    graph = None
    logprobs, ref_logprobs, values = [], [], []
    with _fast_linears(state):
        for i in range(0, len(prompts), cfg.mini_batch_size):
            part = (enc["input_ids"][i:i + cfg.mini_batch_size], enc["attention_mask"][i:i + cfg.mini_batch_size],
                    response_ids[i:i + cfg.mini_batch_size])
            with torch.set_grad_enabled(keep_graph):
                lp, v = _forward(state, policy, *part, with_values=True)
            if keep_graph:
                graph, lp, v = (lp, v), lp.detach(), v.detach()
            with torch.no_grad(), _reference(state) as ref:
                ref_lp, _ = _forward(state, ref, *part, with_values=False)
            logprobs.append(lp)
            ref_logprobs.append(ref_lp)
            values.append(v)
    lengths = mask.sum(1).long()
    responses = [tok.decode(r[:n - int(is_stop[b, n - 1])], skip_special_tokens=True).strip()
                 for b, (r, n) in enumerate(zip(response_ids.tolist(), lengths.tolist()))]
    return Rollout(prompts=list(prompts), responses=responses, prompt_ids=enc["input_ids"],
                   prompt_mask=enc["attention_mask"], response_ids=response_ids, mask=mask,
                   logprobs=torch.cat(logprobs) * mask, ref_logprobs=torch.cat(ref_logprobs) * mask,
                   values=torch.cat(values) * mask, truncated=~is_stop.any(1),
                   timings={"generate": t1 - t0, "logprobs": time.perf_counter() - t1}, graph=graph)


# ============================================================================ 2. score
def _check_scores(scores, batch: Rollout) -> torch.Tensor:
    n = len(batch)
    s = torch.as_tensor(scores.detach() if isinstance(scores, torch.Tensor) else scores, dtype=torch.float32)
    if s.ndim == 2 and s.shape[1] == 1:  # (B, 1) logits of a one-label classifier
        s = s[:, 0]
    if s.shape != (n,):
        raise ValueError(f"reward_fn returned scores of shape {tuple(s.shape)} for {n} responses; "
                         f"expected one score per response, shape ({n},)")
    bad = (~torch.isfinite(s)).nonzero().flatten().tolist()
    if bad:
        i = bad[0]
        raise ValueError(f"reward_fn returned a non-finite score ({s[i].item()}) for sample {i} "
                         f"(prompt {_excerpt(batch.prompts[i])}, response {_excerpt(batch.responses[i])})"
                         + (f" and for {len(bad) - 1} more sample(s): {bad[1:6]}" if len(bad) > 1 else ""))
    return s


def score(state: PPOState | None, batch: Rollout,
          reward_fn: Callable[[list[str], list[str]], torch.Tensor]) -> torch.Tensor:
    """2. ``reward_fn(prompts, responses) -> Tensor[B]`` on text, checked: one finite score per response.

    Text in, so any reward plugs in: classifier pipelines, a cross-encoder with its own tokenizer.
    A non-finite score is an error naming the sample (never silently skipped). ``state`` is unused
    (kept so the notebook loop reads uniformly); the time taken goes into ``batch.timings["score"]``.
    """
    t0 = time.perf_counter()
    with torch.no_grad():
        scores = _check_scores(reward_fn(list(batch.prompts), list(batch.responses)), batch)
    batch.timings["score"] = time.perf_counter() - t0
    return scores


# ============================================================================ 4-7. update
def update(state: PPOState, batch: Rollout, scores: torch.Tensor) -> dict[str, float]:
    """One PPO step on a scored rollout: 4. shaped score + KL penalty, 5. GAE + whitening, 6. clipped update,
    7. stats and the KL controller.

    The policy runs in train mode (so gradient checkpointing is active) with dropout off, which makes the first
    minibatch's ratio exactly 1. With an fp16 policy the loss is scaled (``state.scaler``) and the gradients
    unscaled into the fp32 masters before clipping. Appends the stats to ``run_dir/ppo_log.jsonl``.
    """
    cfg, device, scaler = state.config, state.device, state.scaler
    n = len(batch)
    if n % (cfg.mini_batch_size * cfg.gradient_accumulation_steps):
        raise ValueError(f"update(): {n} samples is not a multiple of mini_batch_size x gradient_accumulation_steps "
                         f"({cfg.mini_batch_size} x {cfg.gradient_accumulation_steps})")
    scores = _check_scores(scores, batch).to(device)                            # (B,) raw
    t0 = time.perf_counter()
    mask, old_logprobs, old_values = batch.mask, batch.logprobs, batch.values    # (B, T)

    # 4. shaped score (running normalisation, clip, truncation penalty); per-token -beta * (logp - ref_logp)
    shaped = shape_scores(scores, state.score_stats, batch.truncated.to(device), norm=cfg.score_norm,
                          clip=cfg.score_clip, truncation_penalty=cfg.truncation_penalty)   # (B,)
    kl_coef = state.kl_ctl.value
    rewards = kl_penalty_rewards(shaped, old_logprobs, batch.ref_logprobs, mask, kl_coef)   # (B, T)
    if cfg.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)

    # 5. GAE, whitened advantages; returns are the value head's targets
    advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
    advantages = masked_whiten(advantages, mask)

    # 6. clipped update: ppo_epochs x minibatches, gradient accumulation, (fp16: scaled loss), clipping
    params = [p for group in state.optimizer.param_groups for p in group["params"]]
    order_rng = torch.Generator().manual_seed(cfg.seed * 1_000_003 + state.step)  # reproducible on resume
    freeze_outside_optimizer(state.policy, state.optimizer)
    state.policy.train()
    state.optimizer.zero_grad(set_to_none=True)
    logs: dict[str, list[float]] = {"pg": [], "vf": [], "clipfrac": [], "approx_kl": [], "vf_clipfrac": []}
    first_logratio = None
    with _fast_linears(state):  # the rollout's kernels (see ppo_models.fast_cpu_linears), backward included
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(n, generator=order_rng).to(device)
            for k, start in enumerate(range(0, n, cfg.mini_batch_size)):
                idx = order[start:start + cfg.mini_batch_size]
                m = mask[idx]                                                        # (b, T)
                if batch.graph is not None and len(idx) == n:  # the rollout's policy pass is this forward, done
                    logprobs, values = (t[idx] for t in batch.graph)
                else:
                    logprobs, values = _forward(state, state.policy, batch.prompt_ids[idx], batch.prompt_mask[idx],
                                                batch.response_ids[idx], with_values=True)
                batch.graph = None  # used at most once (its backward frees it)
                if first_logratio is None:
                    first_logratio = ((logprobs - old_logprobs[idx]).abs() * m).max().item()
                pg_loss, pg_stats = policy_loss(logprobs, old_logprobs[idx], advantages[idx], m, cfg.cliprange)
                vf_loss, vf_clipfrac = value_loss(values, old_values[idx], returns[idx], m, cfg.cliprange_value)
                scaler.scale((pg_loss + cfg.vf_coef * vf_loss) / cfg.gradient_accumulation_steps).backward()
                if (k + 1) % cfg.gradient_accumulation_steps == 0:
                    scaler.unscale_(state.optimizer)                                 # fp16: back to true gradients
                    if cfg.max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                    scaler.step(state.optimizer)                                     # skipped if a gradient is inf
                    scaler.update()
                    state.optimizer.zero_grad(set_to_none=True)
                for key, value in (("pg", pg_loss.item()), ("vf", vf_loss.item()), ("clipfrac", pg_stats["clipfrac"]),
                                   ("approx_kl", pg_stats["approx_kl"]), ("vf_clipfrac", vf_clipfrac)):
                    logs[key].append(value)
    state.policy.eval()

    # 7. stats, KL controller, step
    kl = ((old_logprobs - batch.ref_logprobs) * mask).sum(1)                     # (B,) nats per response
    state.kl_ctl.update(kl.mean().item(), n)
    state.step += 1
    explained = 1 - masked_var(returns - old_values, mask) / masked_var(returns, mask).clamp(min=1e-8)
    stats = {
        "step": state.step,
        "objective/score": scores.mean().item(),
        "objective/score_std": scores.std().item() if n > 1 else 0.0,
        "objective/shaped_score": shaped.mean().item(),
        "objective/kl": kl.mean().item(),
        "objective/kl_coef": kl_coef,
        "objective/entropy": (-old_logprobs * mask).sum(1).mean().item(),
        "policy/approx_kl": float(np.mean(logs["approx_kl"])),
        "policy/clipfrac": float(np.mean(logs["clipfrac"])),
        "policy/first_minibatch_max_abs_logratio": first_logratio,
        "loss/policy": float(np.mean(logs["pg"])),
        "loss/value": float(np.mean(logs["vf"])),
        "val/clipfrac": float(np.mean(logs["vf_clipfrac"])),
        "val/explained_variance": explained.item(),
        "response/length": mask.sum(1).mean().item(),
        "response/truncated": batch.truncated.float().mean().item(),
        "time/generate": batch.timings.get("generate", 0.0),
        "time/logprobs": batch.timings.get("logprobs", 0.0),
        "time/score": batch.timings.get("score", 0.0),
        "time/train": time.perf_counter() - t0,
    }
    log_stats(state, stats)
    return stats


def log_stats(state: PPOState, stats: dict) -> None:
    """Append ``stats`` as one JSON line to ``run_dir/ppo_log.jsonl`` (no-op without a run folder).

    ``update`` calls it; call it yourself to log extra numbers (e.g. an evaluation) next to the PPO stats.
    """
    if state.run_dir is not None:
        with open(state.run_dir / "ppo_log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(stats) + "\n")
