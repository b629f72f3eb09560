"""The math of PPO for RLHF as pure functions, each tested on literal values (``tests/test_ppo.py``).

``sawyer.ppo`` runs them in order; they are importable from there too (``ppo.gae``, ``ppo.policy_loss``, ...).
Masked statistics, score shaping, the KL-penalised rewards, GAE, the two clipped losses, chunked log-probs
and the KL controllers. Shapes: (B,) per response, (B, T) per response token.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint


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


def shape_scores(scores: torch.Tensor, moments: RunningMoments, truncated: torch.Tensor, *, norm: str = "norm",
                 clip: float | None = 3.0, truncation_penalty: float = 0.0) -> torch.Tensor:
    """The score PPO optimises: running normalisation, clip, then the truncation penalty. Shapes (B,).

    ``moments`` first absorbs this batch (as TRL's classic trainer does), so the first batch is normalised by
    its own statistics. See ``PPOConfig.score_norm``/``score_clip``/``truncation_penalty`` for why.
    """
    moments.update(scores)
    std = max(moments.std, 1e-8)
    shaped = {"norm": (scores - moments.mean) / std, "scale": scores / std, "none": scores}[norm]
    if clip is not None:
        shaped = shaped.clamp(-clip, clip)
    return shaped - truncation_penalty * truncated.to(shaped.dtype)


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
    x = logits.float()                                                           # (b, T, V) fp32 (no copy if fp32)
    if temperature != 1.0:
        x = x / temperature
    if suppress_ids and suppress_until > 0:  # what generate's min_new_tokens did to the stop tokens
        banned = torch.zeros(x.shape[1:], dtype=torch.bool, device=x.device)    # (T, V), broadcast over b
        banned[:suppress_until, list(suppress_ids)] = True
        x = x.masked_fill(banned, torch.finfo(x.dtype).min)  # out of place: never writes into the model's logits
    return torch.log_softmax(x, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)   # (b, T)


def gather_logprobs(logits: torch.Tensor, labels: torch.Tensor, chunk_size: int = 4, *, temperature: float = 1.0,
                    suppress_ids: tuple[int, ...] = (), suppress_until: int = 0) -> torch.Tensor:
    """Log-probabilities of ``labels`` (B, T) under ``logits / temperature`` (B, T, V), in fp32.

    The fp32 log-softmax over the vocabulary is the largest tensor of a PPO step (8 x 256 x 128k x 4 bytes =
    1 GiB for Llama-3), so it is built ``chunk_size`` samples at a time; with gradients on, each chunk is
    recomputed in the backward pass (activation checkpointing) instead of being kept. ``suppress_ids`` are
    banned in the first ``suppress_until`` positions, exactly as ``generate(min_new_tokens=...)`` bans them.
    Copies: none of the logits at temperature 1 (fp32 logits), one for the ban; the chunks come from one
    ``split``, whose backward is a single concatenation (slicing would build a full-size zero gradient per chunk).
    """
    out = []
    for chunk, chunk_labels in zip(logits.split(chunk_size), labels.split(chunk_size)):
        args = (chunk, chunk_labels, temperature, tuple(suppress_ids), suppress_until)
        if torch.is_grad_enabled() and logits.requires_grad:
            out.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False))
        else:
            out.append(_chunk_logprobs(*args))
    return torch.cat(out)                                                        # (B, T)


class AdaptiveKLController:
    """Beta moves towards the KL target: ``beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon``.

    Ziegler et al. 2019, section 2.2. Too little KL lowers beta (explore more), too much raises it. The step is
    tiny: ``n / horizon`` = 8 / 10000 at the workshop's batch, so beta changes by <= 0.016% per step (it does
    not steer the KL at workshop scale; it drifts). Plot ``objective/kl_coef`` to see it.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = float(np.clip(current_kl / self.target - 1, -0.2, 0.2))
        self.value *= 1 + proportional_error * n_steps / self.horizon




class FixedKLController:
    """Beta stays at its initial value."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass
