"""Compact PPO for RLHF: causal and seq2seq policies, any text-level reward (see DESIGN.md).

The classic recipe (Ziegler et al. 2019; Stiennon et al. 2020; Huang et al. 2024, "The N implementation
details of RLHF with PPO"; PPO itself: Schulman et al. 2017). Notebook 04 runs the loop in the open::

    state = ppo.setup(policy, tokenizer, PPOConfig(), run_dir=run_dir)   # policy: a PeftModel (LoRA)
    for prompts in batches:
        batch = ppo.rollout(state, prompts)          # 1. sample; 3. log-probs, reference log-probs, values
        scores = ppo.score(state, batch, reward_fn)  # 2. reward_fn(prompts, responses) -> Tensor[B]
        stats = ppo.update(state, batch, scores)     # 4. KL penalty 5. GAE, whitening 6. clipped update 7. stats

``train(state, prompts, reward_fn, steps)`` is the same loop with a progress bar and checkpoints.

Reference model: by default the policy with its LoRA adapter switched off (no second copy of the base).
When PPO starts from an SFT adapter the reference must be that SFT model: load the SFT adapter a second
time as a frozen adapter (``add_frozen_reference_adapter``) and pass ``ref_adapter=``; or pass ``ref_model=``.

Logged metrics (``update`` returns them; one JSON line per step in ``run_dir/ppo_log.jsonl``):

- ``objective/score``: mean reward-model score of the batch (``objective/score_std``: its spread).
- ``objective/kl``: mean over responses of the summed per-token ``logp - ref_logp`` (nats per response).
- ``objective/kl_coef``: beta used for this step's penalty.
- ``objective/entropy``: mean over responses of the summed ``-logp`` of the sampled tokens (a sample estimate).
- ``policy/approx_kl``: ``0.5 * mean((logp_new - logp_old)^2)`` over updates; how far PPO moved from the rollout.
- ``policy/clipfrac``: fraction of tokens whose ratio was clipped; above ~0.2, steps are too big.
- ``policy/first_minibatch_max_abs_logratio``: should be ~0: rollout and training pass agree.
- ``loss/policy``, ``loss/value``: the clipped losses, averaged over minibatches. ``val/clipfrac``: value clips.
- ``val/explained_variance``: 1 - Var(returns - values) / Var(returns); near 1 when the value head predicts well.
- ``response/length``: mean response tokens (stop token included).
- ``time/generate``, ``time/logprobs``, ``time/score``, ``time/train``: seconds spent in each part of the step.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class PPOConfig:
    """PPO hyperparameters. Defaults are the SAWYER workshop's (Part 4 of DESIGN.md).

    learning_rate: Adam step size for LoRA + value head. 1.41e-5 in the workshop; LoRA tolerates 1e-5 to 1e-4.
    batch_size: prompts per PPO step (rollout size). Typically 8 to 64.
    mini_batch_size: samples per gradient step inside an epoch; ``batch_size`` must divide by it.
    gradient_accumulation_steps: minibatches whose gradients add up before one optimiser step.
    ppo_epochs: passes over each rollout. 2 in the workshop, 4 in TRL's classic default; more reuses data
        harder and drifts further from the sampling policy (watch ``policy/clipfrac``).
    kl_coef: initial beta of the per-token penalty ``-beta * (logp - ref_logp)``. 0.2 in the workshop.
    adaptive_kl: adapt beta towards ``kl_target`` (Ziegler et al. 2019) instead of keeping it fixed.
    kl_target: the KL (nats per sequence) the adaptive controller aims for. 6 in the workshop.
    kl_horizon: how many samples it takes the controller to move beta by its proportional error. 10000.
    gamma: discount. 1.0: a response is one episode and only its end is rewarded.
    lam: GAE lambda. 0.95 trades variance (1.0) for bias (0.0).
    cliprange: PPO's epsilon for the probability ratio. Usually 0.1 to 0.3.
    cliprange_value: the same clip for the value function's update.
    vf_coef: weight of the value loss in the total loss. 0.1.
    max_grad_norm: gradient clipping threshold (None: off).
    temperature: sampling temperature; the training pass divides logits by the same value, so the
        log-probs it computes are the ones of the distribution that sampled.
    min_new_tokens / max_new_tokens: response length range at rollout (the original sampled 128-256).
    logprob_chunk_size: samples per chunk when gathering log-probs, so the full-vocabulary fp32
        log-softmax never exists for the whole batch at once.
    gradient_checkpointing: recompute activations in the training pass (memory for compute).
    whiten_rewards: whiten the per-token rewards before GAE (off in the classic recipe).
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
    seed: int = 0


# ============================================================================ the math (pure functions)
def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the entries where ``mask`` is 1."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of ``x`` over the masked entries."""
    n = mask.sum()
    var = masked_mean((x - masked_mean(x, mask)) ** 2, mask)
    return var * n / (n - 1) if n > 1 else var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise the masked entries of ``x`` to unit variance (and zero mean unless ``shift_mean=False``).

    Whitened advantages make the policy step size independent of the reward's scale (Huang et al., detail 6).
    Masked entries come back as 0.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    white = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        white = white + mean
    return white * mask


def kl_penalty_rewards(score: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                       mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards ``-kl_coef * (logp - ref_logp)``, plus the score on each response's last token.

    The penalty is a per-token sample of KL(policy || reference) (Ziegler et al. 2019, eq. 2); it stops the
    policy from drifting into text the reward model over-rates. Shapes: score (B,), the rest (B, T).
    """
    rewards = -kl_coef * (logprobs - ref_logprobs) * mask                       # (B, T)
    last = mask.sum(1).long().clamp(min=1) - 1                                   # (B,) index of the last token
    return rewards.scatter_add(1, last[:, None], score[:, None].to(rewards.dtype))


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens (Schulman et al. 2016).

    ``A_t = delta_t + gamma * lam * A_{t+1}`` with ``delta_t = r_t + gamma * V_{t+1} - V_t``; after the last
    response token the value is 0 (the episode ended). Returns ``(advantages, returns)``, each (B, T), where
    ``returns = advantages + values`` is the value head's regression target.
    """
    rewards, values = rewards * mask, values * mask                              # (B, T)
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(rewards[:, 0])                                   # (B,)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        advantages[:, t] = last_gae
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, cliprange: float) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise.

    ``max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))``: the policy gains nothing by moving a token's
    probability further than ``1 +/- eps`` from the rollout's. Returns the loss and ``clipfrac``/``approx_kl``.
    """
    log_ratio = (logprobs - old_logprobs) * mask                                 # (B, T)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask).item(),
             "approx_kl": (0.5 * masked_mean(log_ratio ** 2, mask)).item()}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float) -> tuple[torch.Tensor, float]:
    """Clipped value loss ``0.5 * max((V - R)^2, (V_clip - R)^2)``, ``V_clip`` within eps of the rollout's value.

    The clip mirrors the policy's (Huang et al., detail "value function loss clipping"). Returns loss, clipfrac.
    """
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)   # (B, T)
    loss_unclipped, loss_clipped = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(loss_unclipped, loss_clipped), mask)
    return loss, masked_mean((loss_clipped > loss_unclipped).float(), mask).item()


def _chunk_logprobs(logits, labels, temperature, suppress_ids, suppress_until):
    x = logits.float() / temperature                                             # (b, T, V) fp32, one chunk
    if suppress_ids and suppress_until > 0:  # what generate's min_new_tokens did to the stop tokens
        x[:, :suppress_until, list(suppress_ids)] = torch.finfo(x.dtype).min
    return torch.log_softmax(x, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)   # (b, T)


def gather_logprobs(logits: torch.Tensor, labels: torch.Tensor, chunk_size: int = 4, *, temperature: float = 1.0,
                    suppress_ids: tuple[int, ...] = (), suppress_until: int = 0) -> torch.Tensor:
    """Log-probabilities of ``labels`` (B, T) under ``logits / temperature`` (B, T, V), in fp32.

    The fp32 log-softmax over the vocabulary is the largest tensor of a PPO step (8 x 256 x 128k x 4 bytes =
    1 GiB for Llama-3), so it is built ``chunk_size`` samples at a time; with gradients on, each chunk is
    recomputed in the backward pass (activation checkpointing) instead of being kept. ``suppress_ids`` are
    banned in the first ``suppress_until`` positions, exactly as ``generate(min_new_tokens=...)`` bans them.
    """
    out = []
    for i in range(0, logits.shape[0], chunk_size):
        args = (logits[i:i + chunk_size], labels[i:i + chunk_size], temperature, tuple(suppress_ids), suppress_until)
        if torch.is_grad_enabled() and logits.requires_grad:
            out.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False))
        else:
            out.append(_chunk_logprobs(*args))
    return torch.cat(out)                                                        # (B, T)


class AdaptiveKLController:
    """Beta moves towards the KL target: ``beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon``.

    Ziegler et al. 2019, section 2.2. Too little KL lowers beta (explore more), too much raises it.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = float(np.clip(current_kl / self.target - 1, -0.2, 0.2))
        self.value *= 1 + proportional_error * n_steps / self.horizon


@dataclass
class RunningMoments:
    """Running mean and (population) variance of every score seen so far, merged batch by batch.

    Chan et al.'s parallel update, in float64 Python numbers so a resumed run continues bit-exactly.
    ``std`` is the unbiased standard deviation (1.0 until two scores have been seen).
    """

    mean: float = 0.0
    var: float = 0.0
    count: int = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().flatten()
        n, mean, var = x.numel(), x.mean().item(), x.var(unbiased=False).item()
        total = self.count + n
        delta = mean - self.mean
        m2 = self.var * self.count + var * n + delta ** 2 * self.count * n / total
        self.mean, self.var, self.count = self.mean + delta * n / total, m2 / total, total

    @property
    def std(self) -> float:
        return math.sqrt(self.var * self.count / (self.count - 1)) if self.count > 1 else 1.0


class FixedKLController:
    """Beta stays at its initial value."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


# ============================================================================ state and set-up
@dataclass
class PPOState:
    """Everything a PPO run carries between steps (what ``save_checkpoint`` writes, plus the models)."""

    policy: Any                       # a peft PeftModel; only its trainable LoRA adapter changes
    tokenizer: Any
    value_head: nn.Linear             # hidden state -> value, fp32
    optimizer: torch.optim.Optimizer  # LoRA + value-head parameters only
    kl_ctl: AdaptiveKLController | FixedKLController
    config: PPOConfig
    adapter: str                      # name of the trainable adapter
    is_seq2seq: bool
    stop_token_ids: tuple[int, ...]   # EOS and any extra stop tokens (e.g. ###STOP###)
    ref_adapter: str | None = None    # a frozen second adapter used as reference (e.g. the SFT adapter)
    ref_model: Any = None             # an explicit reference model
    run_dir: Path | None = None
    step: int = 0
    score_stats: RunningMoments = field(default_factory=lambda: RunningMoments())  # for score_norm
    scaler: Any = None                # torch.amp.GradScaler, enabled when the policy computes in fp16

    @property
    def device(self) -> torch.device:
        return self.value_head.weight.device


def training_state(state: PPOState) -> dict:
    """Everything a bit-exact resume needs besides adapter weights, value head and optimiser (JSON-safe).

    The step, the KL coefficient, the running score statistics and the fp16 loss scale. A checkpoint stores
    this dict; ``restore_training_state`` puts it back.
    """
    return {"step": state.step, "kl_coef": state.kl_ctl.value, "score_stats": dataclasses.asdict(state.score_stats),
            "grad_scaler": state.scaler.state_dict() if state.scaler is not None and state.scaler.is_enabled()
            else {}}


def restore_training_state(state: PPOState, d: dict) -> PPOState:
    """Put back what ``training_state`` returned (into a state built by ``setup`` with the same config)."""
    state.step, state.kl_ctl.value = int(d["step"]), float(d["kl_coef"])
    state.score_stats = RunningMoments(**d.get("score_stats", {}))
    if d.get("grad_scaler") and state.scaler is not None and state.scaler.is_enabled():
        state.scaler.load_state_dict(d["grad_scaler"])
    return state


def add_frozen_reference_adapter(policy, adapter_path: str | Path, adapter_name: str = "reference") -> str:
    """Load an adapter (e.g. the SFT adapter) into ``policy`` a second time, frozen, as the PPO reference.

    Both adapters share the one copy of the (4-bit) base weights. The trainable adapter stays active;
    ``rollout`` switches to this one only for the reference pass. Pass the returned name as ``ref_adapter``.
    """
    policy.load_adapter(str(adapter_path), adapter_name=adapter_name, is_trainable=False)
    for name, p in policy.named_parameters():
        if f".{adapter_name}." in name:
            p.requires_grad_(False)
    return adapter_name


def _one_code_path(model: nn.Module) -> None:
    """Make the training pass compute exactly the rollout's log-probs, so the first ratio is 1.

    Dropout off everywhere, LoRA's too (the classic recipe trains this way; TRL's ``disable_dropout_in_model``),
    including functional rates (T5's ``dropout``, Llama's ``attention_dropout``). And bitsandbytes' CPU backend
    must not repack 4-bit weights for its eval-only kernel (it needs out_features % 32 == 0 and computes
    differently from the training path).
    """
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        for name, value in list(vars(m).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(m, name, 0.0)
        if getattr(m, "support_avx512bf16_for_cpu", False):
            m.support_avx512bf16_for_cpu = False


def _computes_in_fp16(policy) -> bool:
    """True when the policy's forward runs in fp16 (fp16 weights, or 4-bit with fp16 compute)."""
    quant = getattr(policy.config, "quantization_config", None)
    compute = getattr(quant, "bnb_4bit_compute_dtype", None) if not isinstance(quant, dict) else \
        quant.get("bnb_4bit_compute_dtype")
    if compute is not None and (compute == torch.float16 or compute == "float16"):
        return True
    return policy.get_base_model().dtype == torch.float16


def setup(policy, tokenizer, config: PPOConfig | None = None, *, ref_model=None, ref_adapter: str | None = None,
          run_dir: str | Path | None = None, stop_token_ids: tuple[int, ...] | list[int] = ()) -> PPOState:
    """Check the policy, attach a value head and build the optimiser.

    ``policy``: a ``peft.PeftModel`` whose active adapter is trainable LoRA (for 4-bit, call
    ``loading.prepare_for_training`` before attaching LoRA). Everything that is not that adapter's LoRA is
    frozen here. Reference: ``None`` -> the policy with its adapter disabled; ``ref_adapter`` -> a frozen adapter
    in the same PeftModel; ``ref_model`` -> an explicit model sharing the tokenizer. ``stop_token_ids`` end a
    response in addition to EOS. Dropout is switched off in the policy (see ``_one_code_path``), and python,
    numpy and torch are seeded with ``config.seed``.
    """
    from peft import PeftModel
    from transformers import set_seed

    config = config or PPOConfig()
    if not isinstance(policy, PeftModel):
        raise TypeError(f"setup() needs a peft.PeftModel (LoRA attached), got {type(policy).__name__}; "
                        "wrap it with peft.get_peft_model(model, LoraConfig(...)) or load an SFT adapter with "
                        "PeftModel.from_pretrained(model, path, is_trainable=True)")
    if config.batch_size % (config.mini_batch_size * config.gradient_accumulation_steps):
        raise ValueError(f"batch_size ({config.batch_size}) must be a multiple of mini_batch_size x gradient_"
                         f"accumulation_steps ({config.mini_batch_size} x {config.gradient_accumulation_steps})")
    if config.max_new_tokens < max(1, config.min_new_tokens) or config.temperature <= 0:
        raise ValueError(f"need 1 <= min/max_new_tokens ordered and temperature > 0; got {config.min_new_tokens}, "
                         f"{config.max_new_tokens}, {config.temperature}")
    adapter = policy.active_adapter
    if ref_adapter is not None and (ref_adapter == adapter or ref_adapter not in policy.peft_config):
        raise ValueError(f"ref_adapter={ref_adapter!r} must name a second adapter of the policy (it has "
                         f"{list(policy.peft_config)}, trainable: {adapter!r}); see add_frozen_reference_adapter")
    set_seed(config.seed)

    # only the trainable adapter's LoRA weights train; everything else (base, reference adapter) is frozen
    own_lora = re.compile(rf"\.lora_\w+\.{re.escape(adapter)}(\.|$)")
    lora = [p for n, p in policy.named_parameters() if own_lora.search(n) and p.requires_grad]
    if not lora:
        raise ValueError(f"adapter {adapter!r} has no trainable LoRA parameters: load it with is_trainable=True "
                         "(PeftModel.from_pretrained(model, path, is_trainable=True))")
    for name, p in policy.named_parameters():
        if p.requires_grad and not own_lora.search(name):
            p.requires_grad_(False)
    _one_code_path(policy)
    base = policy.get_base_model()
    if config.gradient_checkpointing and base.supports_gradient_checkpointing:
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if ref_model is not None:
        _one_code_path(ref_model.eval())

    # value head on the last hidden state (the decoder's for seq2seq), fp32. A seeded, small normal init
    # (std 0.01 / sqrt(d)) starts the values near 0, so the first advantages are the rewards, not head noise.
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
    # fp16 compute: loss scaling keeps small gradients from flushing to zero (the masters are fp32 above)
    scaler = torch.amp.GradScaler(device.type, enabled=_computes_in_fp16(policy))
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
    timings: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)


#: Generation settings that leave the sampling distribution softmax(logits / T) untouched. rollout() passes
#: all of them (a model's generation_config may set e.g. top_p=0.9) and refuses any other value.
NEUTRAL_SAMPLING = {
    "do_sample": True, "num_beams": 1, "num_return_sequences": 1, "top_k": 0, "top_p": 1.0, "min_p": None,
    "top_h": None, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None, "sequence_bias": None, "suppress_tokens": None, "begin_suppress_tokens": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "exponential_decay_length_penalty": None,
    "guidance_scale": None, "renormalize_logits": False, "remove_invalid_values": False,
    "watermarking_config": None, "use_cache": True,
}


def _check_generation_kwargs(kwargs: dict) -> None:
    for key, value in kwargs.items():
        if key in ("temperature", "min_new_tokens", "max_new_tokens"):
            raise ValueError(f"rollout(): set PPOConfig.{key} instead of passing {key}= (the training pass "
                             "must use the same value)")
        if key not in NEUTRAL_SAMPLING or value != NEUTRAL_SAMPLING[key]:
            why = ("beam search returns high-scoring sequences, not samples, so their log-probs do not describe how "
                   "they were drawn" if key in ("num_beams", "do_sample") else
                   "it changes the sampling distribution and the training pass would not reproduce it")
            raise ValueError(f"rollout() refuses {key}={value!r}: {why}; PPO needs plain sampling from "
                             "softmax(logits / temperature). Allowed: PPOConfig.temperature/min_new_tokens/"
                             "max_new_tokens and the neutral values in ppo.NEUTRAL_SAMPLING")


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
    logits = out.logits if state.is_seq2seq else out.logits[:, :-1]             # (b, T, V)
    cfg = state.config
    logprobs = gather_logprobs(logits, response_ids, cfg.logprob_chunk_size, temperature=cfg.temperature,
                               suppress_ids=state.stop_token_ids, suppress_until=cfg.min_new_tokens)
    if not with_values:
        return logprobs, None
    if state.is_seq2seq:
        hidden = out.decoder_hidden_states[-1]                                   # (b, T, H)
    else:
        hidden = out.hidden_states[-1][:, prompt_ids.shape[1] - 1:-1]            # (b, T, H)
    return logprobs, state.value_head(hidden.float()).squeeze(-1)                # (b, T), (b, T)


@contextmanager
def _reference(state: PPOState):
    """The reference model for one pass: explicit model, frozen reference adapter, or the adapter disabled."""
    if state.ref_model is not None:
        yield state.ref_model
    elif state.ref_adapter is not None:
        state.policy.set_adapter(state.ref_adapter, inference_mode=True)
        try:
            yield state.policy
        finally:  # switching back re-enables grads on the trainable adapter only
            state.policy.set_adapter(state.adapter)
    else:
        with state.policy.disable_adapter():
            yield state.policy


def _excerpt(text: str, n: int = 80) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


def rollout(state: PPOState, prompts: list[str], **generation_kwargs) -> Rollout:
    """1. Sample one response per prompt (one batched ``generate``), then 3. score the tokens: log-probs under
    the policy and the reference, and values, in no-grad passes of ``mini_batch_size`` samples.

    Sampling is plain ``softmax(logits / temperature)`` with the KV cache; anything else (beam search, top-k,
    top-p, repetition penalties) is refused, because the training pass could not reproduce it.
    """
    cfg, tok, policy = state.config, state.tokenizer, state.policy
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"rollout() needs a non-empty list of prompt strings, got {prompts!r}")
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError("rollout(): every prompt must be a string")
    _check_generation_kwargs(generation_kwargs)
    enc = tok(list(prompts), return_tensors="pt", padding=True,
              padding_side="right" if state.is_seq2seq else "left").to(state.device)
    if (enc["attention_mask"].sum(1) == 0).any():
        i = int((enc["attention_mask"].sum(1) == 0).nonzero()[0])
        raise ValueError(f"prompt {i} ({_excerpt(prompts[i])}) has no tokens")

    t0 = time.perf_counter()
    policy.eval()
    sampling = dict(NEUTRAL_SAMPLING, temperature=cfg.temperature, min_new_tokens=cfg.min_new_tokens,
                    max_new_tokens=cfg.max_new_tokens, eos_token_id=list(state.stop_token_ids),
                    pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        sequences = policy.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **sampling)
    response_ids = sequences[:, 1:] if state.is_seq2seq else sequences[:, enc["input_ids"].shape[1]:]  # (B, T)
    is_stop = torch.isin(response_ids, torch.tensor(state.stop_token_ids, device=response_ids.device))
    mask = ((is_stop.cumsum(1) - is_stop.long()) == 0).float()  # keep tokens up to and including the first stop
    t1 = time.perf_counter()

    # 3. log-probs (policy, reference) and values, batched, no grad
    logprobs, ref_logprobs, values = [], [], []
    with torch.no_grad():
        for i in range(0, len(prompts), cfg.mini_batch_size):
            part = (enc["input_ids"][i:i + cfg.mini_batch_size], enc["attention_mask"][i:i + cfg.mini_batch_size],
                    response_ids[i:i + cfg.mini_batch_size])
            lp, v = _forward(state, policy, *part, with_values=True)
            with _reference(state) as ref:
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
                   values=torch.cat(values) * mask,
                   timings={"generate": t1 - t0, "logprobs": time.perf_counter() - t1})


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
    """One PPO step on a scored rollout: 4. KL penalty, 5. GAE + whitening, 6. clipped update, 7. stats.

    The policy runs in train mode (so gradient checkpointing is active) with dropout off, which makes
    the first minibatch's ratio exactly 1. Appends the stats to ``run_dir/ppo_log.jsonl`` and returns them.
    """
    cfg, device = state.config, state.device
    n = len(batch)
    if n % (cfg.mini_batch_size * cfg.gradient_accumulation_steps):
        raise ValueError(f"update(): {n} samples is not a multiple of mini_batch_size x gradient_accumulation_steps "
                         f"({cfg.mini_batch_size} x {cfg.gradient_accumulation_steps})")
    scores = _check_scores(scores, batch).to(device)
    t0 = time.perf_counter()
    mask, old_logprobs, old_values = batch.mask, batch.logprobs, batch.values    # (B, T)

    # 4. KL penalty: per-token -beta * (logp - ref_logp), score added on the last token
    kl_coef = state.kl_ctl.value
    rewards = kl_penalty_rewards(scores, old_logprobs, batch.ref_logprobs, mask, kl_coef)
    if cfg.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)

    # 5. GAE, whitened advantages; returns are the value head's targets
    advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
    advantages = masked_whiten(advantages, mask)

    # 6. clipped update: ppo_epochs x minibatches, gradient accumulation, clipping
    params = [p for group in state.optimizer.param_groups for p in group["params"]]
    order_rng = torch.Generator().manual_seed(cfg.seed * 1_000_003 + state.step)  # reproducible on resume
    state.policy.train()
    state.optimizer.zero_grad(set_to_none=True)
    logs: dict[str, list[float]] = {"pg": [], "vf": [], "clipfrac": [], "approx_kl": [], "vf_clipfrac": []}
    first_logratio = None
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(n, generator=order_rng).to(device)
        for k, start in enumerate(range(0, n, cfg.mini_batch_size)):
            idx = order[start:start + cfg.mini_batch_size]
            m = mask[idx]                                                        # (b, T)
            logprobs, values = _forward(state, state.policy, batch.prompt_ids[idx], batch.prompt_mask[idx],
                                        batch.response_ids[idx], with_values=True)
            if first_logratio is None:
                first_logratio = ((logprobs - old_logprobs[idx]).abs() * m).max().item()
            pg_loss, pg_stats = policy_loss(logprobs, old_logprobs[idx], advantages[idx], m, cfg.cliprange)
            vf_loss, vf_clipfrac = value_loss(values, old_values[idx], returns[idx], m, cfg.cliprange_value)
            ((pg_loss + cfg.vf_coef * vf_loss) / cfg.gradient_accumulation_steps).backward()
            if (k + 1) % cfg.gradient_accumulation_steps == 0:
                if cfg.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                state.optimizer.step()
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


# ============================================================================ checkpoints and the loop
# They live in sawyer/checkpoints.py (with the run-folder rules of sawyer/runs.py); the old names forward there.
_MOVED_TO_CHECKPOINTS = ("save_checkpoint", "load_checkpoint", "prompt_batch", "train")


def __getattr__(name: str):
    """``ppo.train``, ``ppo.save_checkpoint``, ... -> ``sawyer.checkpoints`` (imported lazily: it imports us)."""
    if name in _MOVED_TO_CHECKPOINTS:
        from sawyer import checkpoints

        return getattr(checkpoints, name)
    raise AttributeError(f"module 'sawyer.ppo' has no attribute {name!r}")
