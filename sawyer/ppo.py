"""Compact PPO for RLHF: causal and seq2seq policies, any text-level reward (see DESIGN.md).

(Implementation in progress: only the config is defined so far.)
"""
from __future__ import annotations

from dataclasses import dataclass


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
