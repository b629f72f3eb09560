"""Load models and tokenizers the same way on a laptop CPU, a free T4 and an A100.

One function per model kind (causal LM, seq2seq LM, sequence classifier), each taking a hub id *or* a
local folder, so the ``tiny`` preset and the hub presets share one code path.

Precision (``compute_dtype``):
- bf16 where the GPU supports it (A100, H100): same range as fp32, no loss scaling needed;
- fp16 on a T4 (no bf16 in hardware); the optimiser still keeps fp32 LoRA weights;
- fp32 on CPU (CPU half-precision matmuls are slow or missing).

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


def compute_dtype() -> torch.dtype:
    """bf16 on GPUs that support it, fp16 on older GPUs (T4), fp32 on CPU."""
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


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
    try:
        tok = AutoTokenizer.from_pretrained(resolve(name), trust_remote_code=False)
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
    try:
        model = auto_cls.from_pretrained(resolve(name), dtype=dtype, **kwargs)
    except (OSError, ValueError) as e:
        raise _explain(name, e) from e
    if not load_in_4bit:
        model.to(device())
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
