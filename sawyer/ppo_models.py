"""How PPO handles its models: what trains, the reference adapter, dropout, fp16, and neutral sampling.

The plumbing under ``sawyer.ppo`` that is about PEFT, transformers and bitsandbytes rather than about the
algorithm; ``sawyer.ppo`` re-exports the public names (``add_frozen_reference_adapter``, ``NEUTRAL_SAMPLING``).
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn


def of_adapter(name: str, adapter: str) -> bool:
    """True when parameter ``name`` belongs to ``adapter`` (``...lora_A.ref.weight``, ``...tokens_delta.ref``)."""
    return f".{adapter}." in name or name.endswith(f".{adapter}")


def add_frozen_reference_adapter(policy, adapter_path: str | Path, adapter_name: str = "reference") -> str:
    """Load an adapter (e.g. the SFT adapter) into ``policy`` a second time, frozen, as the PPO reference.

    Both adapters share the one copy of the (4-bit) base weights; the SFT marker rows come with it. The
    trainable adapter stays active; ``rollout`` switches to this one only for the reference pass.
    """
    policy.load_adapter(str(adapter_path), adapter_name=adapter_name, is_trainable=False)
    for name, p in policy.named_parameters():
        if of_adapter(name, adapter_name):
            p.requires_grad_(False)
    return adapter_name


def one_code_path(model: nn.Module) -> None:
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


def computes_in_fp16(policy) -> bool:
    """True when the policy's forward runs in fp16 (fp16 weights, or 4-bit with fp16 compute)."""
    quant = getattr(policy.config, "quantization_config", None)
    compute = quant.get("bnb_4bit_compute_dtype") if isinstance(quant, dict) else getattr(
        quant, "bnb_4bit_compute_dtype", None)
    return compute in (torch.float16, "float16") or policy.get_base_model().dtype == torch.float16


def sft_start_reason(policy, adapter: str) -> str | None:
    """Why disabling ``adapter`` would not give the starting model (marker rows, trained LoRA), or None."""
    if getattr(policy.peft_config[adapter], "trainable_token_indices", None):
        return "it carries trainable token rows (the SFT markers), which disabling the adapter reverts"
    if any(p.abs().max() > 0 for n, p in policy.named_parameters() if ".lora_B." in n and of_adapter(n, adapter)):
        return "its LoRA weights are already trained (lora_B is not zero), so it is not a fresh adapter"
    return None


def freeze_outside_optimizer(policy, optimizer: torch.optim.Optimizer) -> None:
    """Nothing but the optimiser's parameters may require or hold a gradient (PEFT's ``set_adapter`` and
    ``enable_adapters`` switch ``requires_grad`` back on for trainable-token rows, vocab x hidden each)."""
    trainable = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for p in policy.parameters():
        if id(p) not in trainable and (p.requires_grad or p.grad is not None):
            p.requires_grad_(False)
            p.grad = None


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


def check_generation_kwargs(kwargs: dict) -> None:
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


def _contiguous_input(module, args):
    return (args[0].contiguous(), *args[1:]) if args and torch.is_tensor(args[0]) else args


def contiguous_lm_head_input(model) -> None:
    """Make the output embeddings (lm_head) take a contiguous input; installed once per model (idempotent).

    ``logits_to_keep`` gives lm_head a strided view of the last hidden states; a (B, T, H) view times the
    (H, V) weight runs as a batched matmul, and its backward too. One copy of the kept states (B x T x H, small
    next to the B x T x V logits) makes it a single matmul: ~20% faster on the anchor shape's projection.
    (The decode steps' few-row projections are the sampling loop's business: ``fast_cpu_linears``.)
    """
    get_head = getattr(model, "get_output_embeddings", None)  # a plain nn.Module reference has none: left as is
    head = get_head() if get_head is not None else None
    if head is not None and not getattr(head, "_sawyer_contiguous", False):
        head.register_forward_pre_hook(_contiguous_input)
        head._sawyer_contiguous = True


def draw(probs: torch.Tensor) -> torch.Tensor:
    """One token per row of ``probs`` (B, V), drawn by inverting the cumulative distribution: (B,) long.

    The same distribution as ``torch.multinomial(probs, 1)``, with one uniform number per row instead of one
    exponential per vocabulary entry (``multinomial`` spent ~5 ms per draw of 8 x 32k on 2 CPU cores, 16% of a
    decode step; this takes ~0.1 ms). A token of probability 0 is never drawn: its cumulative sum equals its
    predecessor's, and ``searchsorted(right=True)`` returns the first entry strictly above the uniform draw.
    """
    cdf = probs.float().cumsum(-1)                                                # (B, V)
    u = torch.rand(cdf.shape[0], 1, device=cdf.device) * cdf[:, -1:]            # in [0, total)
    return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[1] - 1).squeeze(1)


class _OneDNNLinear(torch.autograd.Function):
    """``F.linear`` with oneDNN's forward and the textbook backward (``grad @ W``, ``grad.T @ x``, row sums).

    oneDNN's op has no derivative of its own. The backward's products keep the standard kernel: a transposed
    oneDNN product would need a transposed copy of every weight. ``x`` is saved only when the weight learns
    (a frozen base weight needs just ``W`` for the input's gradient), as autograd's own linear does.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x if weight.requires_grad else None, weight)
        ctx.has_bias = bias is not None
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ weight                                              # (..., out) @ (out, in)
        rows = grad.reshape(-1, grad.shape[-1])                                 # (N, out)
        if ctx.needs_input_grad[1]:
            grad_w = rows.T @ x.reshape(-1, x.shape[-1])                        # (out, N) @ (N, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = rows.sum(0)
        return grad_x, grad_w, grad_b


def _onednn_linear(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad
                                    or (self.bias is not None and self.bias.requires_grad)):
        return _OneDNNLinear.apply(x, self.weight, self.bias)
    return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def _onednn_works() -> bool:
    """True when this torch has oneDNN's fp32 linear (the op TorchInductor's CPU backend calls) and it computes
    ``F.linear`` on a small probe; checked once, so a torch without it simply keeps the standard kernel."""
    global _ONEDNN
    if _ONEDNN is None:
        try:
            g = torch.Generator().manual_seed(0)  # its own generator: the probe must not move the global seed
            x, w, b = torch.randn(3, 2, 16, generator=g), torch.randn(24, 16, generator=g), torch.randn(24, generator=g)
            got = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
            _ONEDNN = bool(torch.backends.mkldnn.is_available() and got.shape == (3, 2, 24)
                           and torch.allclose(got, nn.functional.linear(x, w, b), atol=1e-4, rtol=1e-4))
        except (AttributeError, RuntimeError, NotImplementedError):
            _ONEDNN = False
    return _ONEDNN


_ONEDNN: bool | None = None


@contextmanager
def fast_cpu_linears(model):
    """On a CPU, run every fp32 ``nn.Linear`` of ``model`` through oneDNN instead of MKL while the block runs.

    A decode step multiplies 8 rows by each weight, a shape where MKL's sgemm reached 8-60 GFLOP/s on 2 cores;
    oneDNN's fp32 linear ran the same products 2-3x faster (hidden 1024: 1.34 -> 0.60 ms for the 1024 x 2816 MLP
    weight; 25.8 -> 8.8 ms for a 32k vocabulary projection), in fp32, within float rounding of MKL (relative
    ~1e-6; it sums in another order). The log-prob and training passes (hundreds of rows) gain less, and their
    backward keeps MKL (``_OneDNNLinear``). PPO runs *every* pass inside this block (sampling, the rollout's
    policy and reference passes, the training forwards), so all log-probs that PPO compares come from one kernel
    and the first minibatch's ratio stays exactly 1. Nothing changes on a GPU, for non-fp32 weights, or where
    this torch lacks the op (``_onednn_works``). Nested blocks leave the outer block's swaps alone.
    """
    swapped = []
    if _onednn_works():
        for m in model.modules():
            if (type(m) is nn.Linear and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32
                    and (m.bias is None or m.bias.dtype == torch.float32) and "forward" not in m.__dict__):
                swapped.append(m)
                m.forward = _onednn_linear.__get__(m)  # an instance attribute: deleting it restores the class's
    try:
        yield
    finally:
        for m in swapped:
            del m.forward


@torch.no_grad()
def sample_causal(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, temperature: float,
                  min_new_tokens: int, max_new_tokens: int, stop_token_ids: tuple[int, ...], pad_token_id: int,
                  scores: list | None = None) -> torch.Tensor:
    """Sample up to ``max_new_tokens`` per left-padded prompt from a causal LM: (B, T) token ids.

    What ``generate(do_sample=True, top_k=0, top_p=1.0, temperature=..., min_new_tokens=..., eos_token_id=stops)``
    samples, written out: a prefill, then one token at a time with the KV cache; the next token is drawn from
    ``softmax(logits / temperature)`` with the stop tokens banned for the first ``min_new_tokens`` positions; a
    row that has sampled a stop token gets ``pad_token_id`` from then on, and the loop ends when every row has
    stopped. Position ids count real tokens only (left padding), as in PPO's training pass. Owning these few
    lines is what makes the rollout fast on a CPU: one draw per row (``draw``), no per-step processor objects,
    and oneDNN's kernels for the few-row products of a decode step (``fast_cpu_linears``).
    ``scores``: a list that receives each step's processed logits (B, V), like generate's ``output_scores``.
    """
    with fast_cpu_linears(model):
        return _sample_causal(model, input_ids, attention_mask, temperature=temperature,
                              min_new_tokens=min_new_tokens, max_new_tokens=max_new_tokens,
                              stop_token_ids=stop_token_ids, pad_token_id=pad_token_id, scores=scores)


def _sample_causal(model, input_ids, attention_mask, *, temperature, min_new_tokens, max_new_tokens, stop_token_ids,
                   pad_token_id, scores):
    batch, device = input_ids.shape[0], input_ids.device
    stops = torch.tensor(stop_token_ids, device=device)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)                      # (B, P)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                logits_to_keep=1)
    cache, position = out.past_key_values, positions[:, -1:]                      # (B, 1)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens = []
    for t in range(max_new_tokens):
        logits = out.logits[:, -1].float()                                       # (B, V)
        if temperature != 1.0:
            logits = logits / temperature
        if t < min_new_tokens:
            logits[:, stops] = float("-inf")
        if scores is not None:
            scores.append(logits)
        token = draw(torch.softmax(logits, -1)).masked_fill_(done, pad_token_id)  # (B,)
        tokens.append(token)
        done |= torch.isin(token, stops)
        if t == max_new_tokens - 1 or bool(done.all()):
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], 1)
        position = position + 1
        out = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=position,
                    past_key_values=cache, use_cache=True)
    return torch.stack(tokens, 1)                                                 # (B, T)
