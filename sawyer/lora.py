"""LoRA configs per architecture (T5, Llama/Qwen, RoBERTa/BERT) and a count of what trains.

LoRA (Hu et al. 2021) freezes a weight ``W`` (d_out x d_in) and learns a low-rank update next to it:
``h = W x + (alpha / r) * B A x`` with ``A`` (r x d_in), ``B`` (d_out x r), ``B = 0`` at the start so the
model begins exactly where the base left off. Only ``A`` and ``B`` train: for an 8B model at r=16 that is
well under 1% of the weights, and the optimiser state shrinks by the same factor, which with 4-bit base
weights (QLoRA) is what fits SFT of an 8B model on one GPU.

Knobs, with typical ranges:
- ``r`` (rank): 8-64 is usual; 128 in the original SAWYER SFT. Higher rank = more capacity, more memory.
- ``alpha``: the update is scaled by ``alpha / r``; alpha = r or 2r is common. The original r=128, alpha=32
  gives a scale of 0.25, a gentle update.
- ``dropout``: 0.0-0.1 on the LoRA input; 0.05 here as in the original.
- ``targets``: ``"all-linear"`` (default; every linear layer of the transformer blocks, the QLoRA paper's
  advice, usually better per parameter) or ``"qv"`` (only the query and value projections, the original
  LoRA paper's and the original workshop's choice).

Where we depart from the original workshop: ``all-linear`` by default (the original used q/v), and the
output layer (``lm_head``) or the classification head is never a LoRA target: the LM head's rows are the
vocabulary (new marker rows are handled by ``sawyer.tokens``), and a fresh classification head has to be
trained in full, so it goes in ``modules_to_save``.
"""
from __future__ import annotations

import re

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model

#: Per ``config.model_type``: (family, the query and value projections' names).
ARCHITECTURES = {
    "llama": ("Llama/Qwen", ("q_proj", "v_proj")),
    "qwen2": ("Llama/Qwen", ("q_proj", "v_proj")),
    "qwen3": ("Llama/Qwen", ("q_proj", "v_proj")),
    "mistral": ("Llama/Qwen", ("q_proj", "v_proj")),
    "t5": ("T5", ("q", "v")),
    "roberta": ("RoBERTa/BERT", ("query", "value")),
    "bert": ("RoBERTa/BERT", ("query", "value")),
}

#: Names of the classification head in ``*ForSequenceClassification`` models (RoBERTa/BERT, Llama/Qwen).
_HEAD_NAMES = ("classifier", "score")


def _supported() -> str:
    return ", ".join(f"{t} ({fam})" for t, (fam, _) in ARCHITECTURES.items())


def _model_type(model) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(f"no LoRA recipe for {type(model).__name__} (model_type={model_type!r}); "
                         f"supported model types: {_supported()}")
    return model_type


def task_type(model) -> TaskType:
    """``CAUSAL_LM`` / ``SEQ_2_SEQ_LM`` / ``SEQ_CLS`` / ``FEATURE_EXTRACTION``, from the model's class."""
    name = type(model).__name__
    if name.endswith("ForCausalLM"):
        return TaskType.CAUSAL_LM
    if name.endswith(("ForConditionalGeneration", "ForSeq2SeqLM")) and model.config.is_encoder_decoder:
        return TaskType.SEQ_2_SEQ_LM
    if name.endswith("ForSequenceClassification"):
        return TaskType.SEQ_CLS
    if name.endswith("Model"):  # a bare encoder (RobertaModel, BertModel): hidden states out
        return TaskType.FEATURE_EXTRACTION
    raise ValueError(f"cannot tell the task of {name}: expected a *ForCausalLM, *ForConditionalGeneration, "
                     f"*ForSequenceClassification or bare *Model class")


def head_name(model) -> str | None:
    """Full module name of the output head (``lm_head``, ``classifier``, ``score``), or None."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is None:
        out = next((getattr(model, n) for n in _HEAD_NAMES if isinstance(getattr(model, n, None), torch.nn.Module)),
                   None)
    if out is None:
        return None
    return next(name for name, module in model.named_modules() if module is out)


def linear_names(model) -> list[str]:
    """Leaf names of every linear layer outside the output head (what ``all-linear`` targets), sorted.

    ``bitsandbytes``' ``Linear4bit`` subclasses ``nn.Linear``, so 4-bit models resolve the same way.
    """
    head = head_name(model)
    names = set()
    for name, module in model.named_modules():
        in_head = head is not None and (name == head or name.startswith(head + "."))
        if isinstance(module, torch.nn.Linear) and not in_head:
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def lora_config(model, *, r: int = 16, alpha: int = 32, dropout: float = 0.05, targets: str = "all-linear",
                trainable_token_indices: dict[str, list[int]] | list[int] | None = None) -> LoraConfig:
    """A ``peft.LoraConfig`` for ``model``'s architecture.

    ``targets``: ``"all-linear"`` (every linear layer outside the head) or ``"qv"`` (query and value
    projections: Llama/Qwen ``q_proj``/``v_proj``, T5 ``q``/``v``, RoBERTa/BERT ``query``/``value``).
    The task type comes from the model class; for a classifier the head goes in ``modules_to_save``
    (trained in full and saved with the adapter) and is excluded from the LoRA targets.
    ``trainable_token_indices``: rows of the embedding (and untied output) layer to train and save,
    e.g. the new markers' rows: build it with ``sawyer.tokens.token_indices_for_lora``.
    """
    model_type = _model_type(model)
    task = task_type(model)
    if targets == "qv":
        target_modules = list(ARCHITECTURES[model_type][1])
    elif targets == "all-linear":
        target_modules = linear_names(model)
    else:
        raise ValueError(f"targets must be 'all-linear' or 'qv', got {targets!r}")
    head = head_name(model)
    # Leaf names like "dense" also occur inside RoBERTa's classification head: keep the whole head out.
    exclude = rf"(.*\.)?{re.escape(head)}(\..*)?" if head else None
    modules_to_save = [head] if task == TaskType.SEQ_CLS and head else None
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                      exclude_modules=exclude, task_type=task, modules_to_save=modules_to_save,
                      trainable_token_indices=trainable_token_indices, bias="none")


def add_lora(model, config: LoraConfig) -> PeftModel:
    """Wrap ``model`` with LoRA: base weights frozen, only the adapter (and saved modules/rows) train.

    For a 4-bit model call ``sawyer.loading.prepare_for_training`` *before* this: it freezes every
    parameter, so calling it after would freeze the LoRA weights too.
    """
    peft_model = get_peft_model(model, config)
    if not any(p.requires_grad for p in peft_model.parameters()):
        raise RuntimeError(f"LoRA on {type(model).__name__} left nothing trainable (targets "
                           f"{config.target_modules}); check the target names")
    return peft_model


def _numel(param: torch.Tensor) -> int:
    # bitsandbytes packs two 4-bit values per byte of its storage dtype (as PEFT counts them)
    if type(param).__name__ == "Params4bit":
        return param.numel() * 2 * param.element_size()
    return param.numel()


class TrainableSummary(dict):
    """``{"trainable", "total", "percent"}``; prints like PEFT's ``print_trainable_parameters``."""

    def __str__(self) -> str:
        return format_summary(self)


def trainable_summary(model) -> TrainableSummary:
    """Trainable and total parameter counts (shared weights counted once, 4-bit weights unpacked)."""
    params = dict(model.named_parameters())  # named_parameters() skips tied duplicates
    trainable = sum(_numel(p) for p in params.values() if p.requires_grad)
    total = sum(_numel(p) for p in params.values())
    return TrainableSummary(trainable=trainable, total=total, percent=100.0 * trainable / max(total, 1))


def format_summary(summary_or_model) -> str:
    """``trainable params: 1,234 || all params: 5,678 || trainable%: 21.7316`` (returned, not printed)."""
    s = summary_or_model if isinstance(summary_or_model, dict) else trainable_summary(summary_or_model)
    return f"trainable params: {s['trainable']:,d} || all params: {s['total']:,d} || trainable%: {s['percent']:.4f}"
