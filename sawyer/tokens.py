"""The SAWYER markers as new tokens, their embedding rows, and adapters that save only what changed.

SAWYER's template (``sawyer.chat``) marks turns with ``###HUMAN###``, ``###BOT###`` and ``###STOP###``.
Added as *special* tokens, each marker is one id that BPE never splits.

Why initialise the new rows by hand: resizing appends rows the model has never trained. LoRA only adds
low-rank updates to linear layers, so it cannot move an embedding row at all; a marker would keep its
arbitrary starting vector for the whole of SFT. So each new row starts as the mean of the embeddings of a
phrase that says what the marker means ("The human said:" for ``###HUMAN###``): the model then reads the
marker roughly as it reads the phrase from the first step (the vocabulary-expansion trick, Hewitt 2021,
https://nlp.stanford.edu/~johnhew/vocab-expansion.html). The *output* layer needs the same: when
``lm_head`` is untied (Llama-3-8B), its new rows decide how likely the model is to *emit* ``###STOP###``.
The original workshop set only the input rows and left the untied ``lm_head`` rows at their resize default,
a bug we do not copy. When input and output are tied (Qwen2.5-1.5B) they are one matrix, set once.

Saving only what changed: PEFT's default ``save_pretrained`` notices the resized vocabulary and stores both
full embedding matrices with the adapter (2 x 128256 x 4096 values for Llama-3-8B: the original's 2.3 GB
adapter). Instead the marker rows go in the LoRA config as ``trainable_token_indices``
(``token_indices_for_lora``): PEFT then trains those rows (an improvement on the original, whose markers
stayed frozen) and saves only them, for the input embeddings and for an untied ``lm_head`` alike, and we save
with ``save_embedding_layers=False``. Reloading (``load_adapter``) rebuilds the base, resizes it, re-applies
the phrase means, and lets the adapter put the trained rows back exactly.

Stopping at ``###STOP###``: the tokenizer's EOS and ``generation_config.eos_token_id`` are left unchanged;
pass the marker's id as an extra stop id at generation time (``sawyer.chat`` does).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from sawyer.presets import DEFAULT_PHRASES

#: Written next to the adapter: embedding size, marker ids and phrases, so a reload can rebuild the base.
TOKENS_FILE = "sawyer_tokens.json"


def _embedding_name(model, module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def _unwrap(layer):
    """The plain layer under PEFT wrappers (whose ``.weight`` is a freshly merged copy, not the parameter)."""
    while True:
        inner = getattr(layer, "original_module", None)
        inner = getattr(layer, "base_layer", None) if inner is None else inner
        if inner is None:
            return layer
        layer = inner


def is_tied(model) -> bool:
    """True when the output layer shares its weight with the input embeddings (or there is no output layer)."""
    out = model.get_output_embeddings()
    if out is None:
        return True
    return _unwrap(out).weight.data_ptr() == _unwrap(model.get_input_embeddings()).weight.data_ptr()


def _init_rows(model, ids: dict[str, int], phrase_ids: dict[str, list[int]]) -> None:
    """Set each marker's input row (and untied output row) to the mean of its phrase's rows."""
    layers = [model.get_input_embeddings()] + ([] if is_tied(model) else [model.get_output_embeddings()])
    for layer in layers:
        if type(layer).__name__.endswith(("4bit", "8bit")):
            raise ValueError(f"{type(layer).__name__} {_embedding_name(model, layer)!r} is quantised: its rows "
                             f"cannot be set; load the model with the output layer unquantised (the default)")
        weight = layer.weight                                                   # (V, H)
        bias = getattr(layer, "bias", None)
        with torch.no_grad():
            for marker, i in ids.items():
                rows = torch.as_tensor(phrase_ids[marker], device=weight.device)  # (n,)
                weight[i] = weight[rows].float().mean(0).to(weight.dtype)         # (H,)
                if bias is not None:
                    bias[i] = bias[rows].float().mean().to(bias.dtype)


def _phrase_ids(tokenizer, phrases: dict[str, str]) -> dict[str, list[int]]:
    out = {}
    for marker, phrase in phrases.items():
        ids = tokenizer(phrase, add_special_tokens=False)["input_ids"]  # no BOS: its row is not the meaning
        if not ids:
            raise ValueError(f"the phrase for {marker!r} is empty after tokenisation: {phrase!r}")
        out[marker] = ids
    return out


def add_special_tokens(model, tokenizer, phrases: dict[str, str] | None = None, *,
                       pad_to_multiple_of: int | None = None) -> dict[str, int]:
    """Add the markers, grow the embeddings, initialise the new rows; returns ``{marker: id}``.

    ``phrases``: ``{marker: phrase}``, default ``presets.DEFAULT_PHRASES``. Idempotent: a marker the
    tokenizer already has keeps its id and its rows (unless its row lies past the model's old embedding
    size, i.e. the model was never resized for it). Old rows are untouched. The matrix never shrinks (Qwen
    ships spare rows past its vocabulary; new ids may land in them, and those rows are initialised too).
    ``pad_to_multiple_of``: round the new size up (e.g. 64) for faster matmuls on tensor cores.
    """
    phrases = dict(DEFAULT_PHRASES if phrases is None else phrases)
    phrase_ids = _phrase_ids(tokenizer, phrases)  # before adding: phrases never contain the markers
    known = set(tokenizer.get_vocab())
    old_rows = model.get_input_embeddings().weight.shape[0]

    tokenizer.add_tokens([m for m in phrases if m not in known], special_tokens=True)
    ids = {m: tokenizer.convert_tokens_to_ids(m) for m in phrases}
    new_rows = max(len(tokenizer), old_rows)
    if pad_to_multiple_of:
        new_rows = -(-new_rows // pad_to_multiple_of) * pad_to_multiple_of
    if new_rows != old_rows:
        # mean_resizing: spare rows (padding) start near the average token, so they are rarely sampled
        model.resize_token_embeddings(new_rows, mean_resizing=True)
    _init_rows(model, {m: i for m, i in ids.items() if m not in known or i >= old_rows}, phrase_ids)

    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.sawyer_phrases = {**getattr(model, "sawyer_phrases", {}), **phrases}  # read by save_adapter
    return ids


def token_indices_for_lora(model, ids) -> dict[str, list[int]]:
    """``trainable_token_indices`` for ``lora_config``: the marker rows of the input embeddings, plus the
    same rows of an untied output layer (a tied one follows the input automatically in PEFT).

    ``ids``: ``{marker: id}`` (as ``add_special_tokens`` returns) or a list of ids.
    """
    rows = sorted(set(ids.values() if isinstance(ids, dict) else ids))
    indices = {_embedding_name(model, model.get_input_embeddings()): rows}
    if not is_tied(model):
        indices[_embedding_name(model, model.get_output_embeddings())] = rows
    return indices


def _check_rows_saved(peft_model, ids: dict[str, int]) -> None:
    """Refuse to save an adapter that would drop the markers' rows (they would reload as resize noise)."""
    base = peft_model.get_base_model()
    layers = [base.get_input_embeddings()] + ([] if is_tied(base) else [base.get_output_embeddings()])
    for layer in layers:
        adapter = getattr(layer, "token_adapter", None)
        saved = set(adapter.token_indices.get(peft_model.active_adapter, [])) if adapter is not None else set()
        missing = {m: i for m, i in ids.items() if i not in saved}
        if missing:
            raise ValueError(f"the adapter does not hold the rows of {missing} in {_embedding_name(base, layer)!r}, "
                             f"so they would be lost on save; build the LoRA config with "
                             f"lora_config(model, trainable_token_indices=token_indices_for_lora(model, ids))")


def save_adapter(peft_model, tokenizer, folder) -> int:
    """Save the adapter (LoRA weights + marker rows only), the tokenizer with its markers, and
    ``sawyer_tokens.json``; returns the folder's size in bytes (``format_bytes`` makes it readable)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = peft_model.get_base_model()
    phrases = getattr(base, "sawyer_phrases", {})
    ids = {m: tokenizer.convert_tokens_to_ids(m) for m in phrases}
    _check_rows_saved(peft_model, ids)
    # "auto" would store both full embedding matrices because the vocabulary was resized
    peft_model.save_pretrained(folder, save_embedding_layers=False)
    tokenizer.save_pretrained(folder)
    meta = {"num_embeddings": base.get_input_embeddings().weight.shape[0], "ids": ids, "phrases": phrases}
    (folder / TOKENS_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return adapter_size(folder)


def load_adapter(base_model_name_or_model, folder, *, load_in_4bit: bool = False, is_trainable: bool = False):
    """``(peft_model, tokenizer)`` from a folder written by ``save_adapter``.

    Loads the base (``sawyer.loading``, by the adapter's task type) unless a model is passed, the tokenizer
    from ``folder``, resizes the embeddings to the saved size, re-applies the phrase means to the marker
    rows (so the base with the adapter disabled, e.g. PPO's reference, is the SFT starting point), then
    attaches the adapter, whose saved rows replace those rows exactly. With ``is_trainable`` and a 4-bit
    base, the base is readied for training first (doing it after attaching would freeze the adapter).
    """
    from peft import PeftConfig, PeftModel

    from sawyer import loading

    folder = Path(folder)
    config = PeftConfig.from_pretrained(str(folder))
    model = base_model_name_or_model
    if isinstance(model, (str, Path)):
        load = {"SEQ_2_SEQ_LM": loading.load_seq2seq_lm, "SEQ_CLS": loading.load_classifier}.get(
            getattr(config.task_type, "value", config.task_type), loading.load_causal_lm)
        model = load(str(model), load_in_4bit=load_in_4bit)
    tokenizer = loading.load_tokenizer(str(folder))
    meta_path = folder / TOKENS_FILE
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.exists() else {}
    rows = meta.get("num_embeddings", max(len(tokenizer), model.get_input_embeddings().weight.shape[0]))
    if rows != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(rows, mean_resizing=False)  # the rows that matter are restored below
    if meta.get("phrases"):
        _init_rows(model, meta["ids"], _phrase_ids(tokenizer, meta["phrases"]))
        model.sawyer_phrases = meta["phrases"]
    if is_trainable and loading.is_4bit(model):
        model = loading.prepare_for_training(model, gradient_checkpointing=False)
    return PeftModel.from_pretrained(model, str(folder), is_trainable=is_trainable), tokenizer


def adapter_size(folder) -> int:
    """Total bytes of the files in ``folder`` (recursively)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def format_bytes(n: int) -> str:
    """``1536`` -> ``'1.5 KiB'``; binary units, as file managers on Linux show them."""
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
