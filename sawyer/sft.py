"""Supervised fine-tuning (SFT): teach a raw base LLM the SAWYER conversation layout with LoRA.

The recipe (DESIGN.md, Part 2): render each conversation with ``sawyer.chat``, tokenise it, put the loss
on the final assistant reply plus ``###STOP###`` only, and train LoRA adapters (and the new marker rows)
on a frozen, optionally 4-bit, base model.

**Completion-only loss.** Labels are ``-100`` (ignored by the cross-entropy) over the prompt: the human
turns, the earlier bot turns and the final ``###BOT###``. Training on the prompt would teach the model to
write the *human's* part too, and spends gradient on text we never want generated. What remains is
exactly what we want: answer, then emit ``###STOP###`` so generation ends (Ouyang et al. 2022 also
mask the prompt; TRL calls it ``completion_only_loss``).

**Filter, don't truncate.** The end of a conversation *is* the completion. Truncating to ``max_seq_len``
would cut the reply and its ``###STOP###`` (teaching the model never to stop) or leave every label masked
(a batch that teaches nothing). So over-long conversations are dropped and counted.

**QLoRA memory.** An 8B model is ~16 GB in bf16 but ~5 GB as 4-bit NF4 (Dettmers et al. 2023). The frozen
4-bit weights get no gradients and no optimiser state; only the LoRA matrices (tens of MB) and the marker
rows train, in fp32. Gradient checkpointing trades ~30% compute for activation memory.

**Why ``transformers.Trainer`` rather than TRL's ``SFTTrainer``.** Our examples arrive tokenised with
their label mask, so SFTTrainer would skip its dataset preparation and take our collator anyway; what is
left of it is a fused LM head that TRL 1.16 patches into the model's forward. That head reads
``lm_head.weight`` and ``lm_head.bias`` directly and fails on PEFT's wrapper around our untied ``lm_head``,
the one that trains the new marker rows (``AttributeError: 'TrainableTokensWrapper' object has no
attribute 'bias'``, checked with TRL 1.16.0 / PEFT 0.21.2). ``Trainer`` with our collator calls the model's
own forward (loss = mean over the unmasked tokens), which is all SFT needs.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from sawyer.chat import STOP, extract_reply, format_prompt, split_for_training, stop_token_ids

IGNORE_INDEX = -100  # label value the cross-entropy skips (PyTorch's ignore_index default)


# --------------------------------------------------------------------------- examples and the label mask
def _stop_id(tokenizer) -> int:
    vocab = tokenizer.get_vocab()
    if STOP not in vocab:
        raise ValueError(f"the tokenizer has no {STOP!r} token: add the markers first "
                         "(sawyer.tokens.add_special_tokens)")
    return vocab[STOP]


def tokenize_example(prompt: str, completion: str, tokenizer) -> dict[str, list[int]]:
    """``{"input_ids", "labels"}`` for one (prompt, completion) pair, labels ``-100`` over the prompt.

    The two parts are tokenised separately and concatenated, so the prompt/completion boundary is exact
    (tokenising the joined text could merge tokens across it). The prompt gets the tokenizer's BOS when it
    adds one; the completion gets no special tokens: it already ends with ``###STOP###``.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=True, verbose=False)["input_ids"]
    if tokenizer.eos_token_id is not None and prompt_ids and prompt_ids[-1] == tokenizer.eos_token_id:
        prompt_ids = prompt_ids[:-1]  # a tokenizer that appends EOS (T5-style) must not end the prompt
    completion_ids = tokenizer(completion, add_special_tokens=False, verbose=False)["input_ids"]
    return {"input_ids": prompt_ids + completion_ids,
            "labels": [IGNORE_INDEX] * len(prompt_ids) + list(completion_ids)}


def build_examples(conversations, tokenizer, max_seq_len: int) -> tuple[list[dict], dict[str, int]]:
    """Tokenised SFT examples from conversations (lists of turns ending on a bot turn), and counts.

    Conversations longer than ``max_seq_len`` tokens are filtered out, not truncated (see the module
    docstring). Returns ``(examples, {"kept": n, "too_long": m})``; each example is
    ``{"input_ids": [...], "labels": [...]}`` with ``-100`` labels over the prompt.
    """
    stop_id = _stop_id(tokenizer)
    examples, too_long = [], 0
    for i, turns in enumerate(conversations):
        prompt, completion = split_for_training(turns)
        ex = tokenize_example(prompt, completion, tokenizer)
        if ex["input_ids"][-1] != stop_id:
            raise ValueError(f"conversation {i}: the completion does not end with the single {STOP!r} token "
                             f"(id {stop_id}); got ids {ex['input_ids'][-4:]}")
        if len(ex["input_ids"]) > max_seq_len:
            too_long += 1
            continue
        examples.append(ex)
    return examples, {"kept": len(examples), "too_long": too_long}


@dataclass
class CompletionOnlyCollator:
    """Right-pads a batch of examples: ``input_ids`` with ``pad_token_id``, ``attention_mask`` 0, ``labels`` -100.

    Padding positions never carry loss (label -100) and are never attended to (mask 0), so the pad id can
    be EOS (Llama-3 has no pad token) without teaching the model anything about EOS.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None  # e.g. 8 for tensor cores on a GPU

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = math.ceil(length / self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(features), length), self.pad_token_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(features), length), dtype=torch.long)  # (B, T)
        labels = torch.full((len(features), length), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[row, :n] = torch.as_tensor(f["input_ids"])
            attention_mask[row, :n] = 1
            labels[row, :n] = torch.as_tensor(f["labels"])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# --------------------------------------------------------------------------- the model
def prepare_sawyer_model(cfg, *, verbose: bool = True):
    """``(peft_model, tokenizer, marker_ids)`` ready for SFT from an ``SFTConfig``.

    Steps: load the base (4-bit NF4 when ``cfg.load_in_4bit``; bitsandbytes' CPU backend runs it too),
    add the three markers with phrase-mean input *and* output rows (``sawyer.tokens``), ready the model
    for training (``sawyer.loading.prepare_for_training``), attach LoRA with the marker rows trainable and
    saved (``sawyer.lora``), and print how few parameters train.
    """
    from sawyer import lora, tokens
    from sawyer.loading import load_causal_lm, load_tokenizer, prepare_for_training

    model = load_causal_lm(cfg.base_model, load_in_4bit=cfg.load_in_4bit)
    tokenizer = load_tokenizer(cfg.base_model)
    marker_ids = tokens.add_special_tokens(model, tokenizer, cfg.phrases)
    model = prepare_for_training(model, gradient_checkpointing=cfg.gradient_checkpointing)
    config = lora.lora_config(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                              targets=cfg.lora_targets,
                              trainable_token_indices=tokens.token_indices_for_lora(model, marker_ids))
    model = lora.add_lora(model, config)
    if verbose:
        print(lora.trainable_summary(model))
    return model, tokenizer, marker_ids


# --------------------------------------------------------------------------- training
def precision_flags() -> dict[str, bool]:
    """``TrainingArguments``' ``bf16``/``fp16`` from ``sawyer.loading.precision()`` (real hardware support).

    fp16 (a T4) is mixed precision done right for LoRA: the base computes in fp16 under autocast, the LoRA
    weights and marker rows that train stay fp32 masters (``train_sft`` upcasts them), and the Trainer's fp16
    path scales the loss (a ``GradScaler``) so small fp16 gradients do not flush to zero, then unscales
    before clipping and the optimiser step. bf16 needs no scaling (fp32's exponent range).
    """
    from sawyer.loading import precision

    p = precision()
    return {"bf16": p == "bf16", "fp16": p == "fp16"}


def training_arguments(cfg, output_dir: str | Path, *, progress: bool = True, logging_steps: float = 0.05,
                       save_steps: int | None = None, eval_steps: int | None = None):
    """``transformers.TrainingArguments`` from an ``SFTConfig``.

    Precision (``precision_flags``): bf16 autocast where the GPU computes bf16 in hardware, fp16 with loss
    scaling on a T4, fp32 on CPU.
    ``logging_steps < 1`` is a fraction of the run (0.05: twenty log lines). Full models are never saved:
    with ``save_steps`` the checkpoints hold the adapter and optimiser state only (enough to resume).
    """
    from transformers import TrainingArguments

    cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(output_dir), seed=cfg.seed, report_to=[], disable_tqdm=not progress,
        learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # a float < 1 is a ratio of the total steps (transformers >= 5)
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps,
        activation_checkpointing=cfg.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        **precision_flags(),
        logging_steps=logging_steps, logging_first_step=True,
        eval_strategy="steps" if eval_steps else "no", eval_steps=eval_steps,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, save_total_limit=2,
        remove_unused_columns=False, label_names=["labels"], dataloader_pin_memory=cuda)


def _jsonl_logger(path: Path):
    from transformers import TrainerCallback

    class JsonlLog(TrainerCallback):
        """Appends every log dict (loss, lr, eval_loss, ...) to ``sft_log.jsonl`` as it happens."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                with path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": state.global_step, **logs}) + "\n")

    return JsonlLog()


def _keep_4bit_trainable_on_cpu(model) -> None:
    """bitsandbytes' CPU backend repacks a 4-bit layer for fast inference the first time it runs in eval mode
    without grad (``evaluate()``, ``generate()``). The packed kernel has no backward, so later training steps
    silently drop the gradient through every base layer (checked with bitsandbytes 0.50.2: the first layer's
    LoRA gradients became 0). Switch the repacking off and undo it where it already happened."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):  # bitsandbytes Linear4bit
            module.support_avx512bf16_for_cpu = False
            weight = module.weight
            if getattr(weight.quant_state, "packing_format_for_cpu", False):
                from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

                weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data,
                                                                                         weight.quant_state)


def _adapter_only_trainer(**kwargs):
    from transformers import Trainer

    from sawyer.tokens import save_adapter

    class AdapterOnlyTrainer(Trainer):
        """Checkpoints in ``sawyer.tokens.save_adapter``'s format: LoRA weights and marker rows only (PEFT's
        default would add both full embedding matrices, since the vocabulary was resized)."""

        def _save(self, output_dir=None, state_dict=None):
            output_dir = Path(output_dir or self.args.output_dir)
            save_adapter(self.model, self.processing_class, output_dir)
            torch.save(self.args, output_dir / "training_args.bin")

    return AdapterOnlyTrainer(**kwargs)


def train_sft(model, tokenizer, train_examples: list[dict], eval_examples: list[dict], cfg, *,
              output_dir: str | Path, progress: bool = True, save_steps: int | None = None,
              eval_steps: int | None = None, resume_from_checkpoint: str | bool | None = None) -> dict:
    """Run SFT; returns ``{"eval_loss_before", "eval_loss_after", "train_loss", "steps", "log_history"}``.

    Eval loss (completion tokens only) is measured before and after training on at most
    ``cfg.eval_batches`` batches. Logs are appended to ``output_dir/sft_log.jsonl``. ``resume_from_checkpoint``: a
    ``checkpoint-N`` folder written with ``save_steps`` (or True for the latest complete one, if any: a
    fresh start otherwise); each checkpoint is also an adapter folder that ``sawyer.tokens.load_adapter``
    reads. A damaged checkpoint file raises ``sawyer.runs.DamagedFile`` naming it; log lines written after
    the checkpoint (the killed run's) are dropped, so the resumed log has each step once.
    """
    from sawyer import checkpoints, runs
    from transformers import PrinterCallback

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if not train_examples:
        raise ValueError("no training examples (all filtered out? raise max_seq_len or check the data)")
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters: attach LoRA first (prepare_sawyer_model)")
    for p in trainable:  # fp32 master weights for what trains, also under fp16/bf16 autocast
        if p.dtype != torch.float32:
            p.data = p.data.float()
    _keep_4bit_trainable_on_cpu(model)
    if model.config.pad_token_id is None:  # else Trainer "aligns" it with a warning
        model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.eval_batches is not None:
        eval_examples = eval_examples[:cfg.eval_batches * cfg.batch_size]
    args = training_arguments(cfg, output_dir, progress=progress, save_steps=save_steps,
                              eval_steps=eval_steps if eval_examples else None)
    trainer = _adapter_only_trainer(
        model=model, args=args, train_dataset=train_examples, eval_dataset=eval_examples or None,
        data_collator=CompletionOnlyCollator(tokenizer.pad_token_id), processing_class=tokenizer,
        callbacks=[_jsonl_logger(output_dir / "sft_log.jsonl")])
    if not progress:
        trainer.remove_callback(PrinterCallback)  # Trainer prints every log dict when tqdm is off
    if resume_from_checkpoint is True:
        resume_from_checkpoint = checkpoints.last_trainer_checkpoint(output_dir)  # None: nothing to resume
        log = output_dir / "sft_log.jsonl"
        done = int(resume_from_checkpoint.name.split("-")[-1]) if resume_from_checkpoint else 0
        kept = [r for r in runs.read_log(log, max_step=done) if not (r["step"] == 0 and "eval_loss" in r)]
        log.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")  # evaluated again below
    elif resume_from_checkpoint:
        checkpoints.check_files(resume_from_checkpoint, f"delete {resume_from_checkpoint} or set resume=False")
    before = trainer.evaluate()["eval_loss"] if eval_examples else None
    with runs.disk_errors(output_dir, "SFT checkpoints"):
        result = trainer.train(resume_from_checkpoint=resume_from_checkpoint or None)
    after = trainer.evaluate()["eval_loss"] if eval_examples else None
    model.eval()
    return {"eval_loss_before": before, "eval_loss_after": after, "train_loss": result.training_loss,
            "steps": result.global_step, "log_history": list(trainer.state.log_history)}


# --------------------------------------------------------------------------- generation
@dataclass
class Generation:
    """One generated answer: the extracted ``reply`` and the token that ended it.

    ``stopped_at`` is ``"###STOP###"`` (learned SFT behaviour), the EOS string (a base model finishing a
    document), or ``None`` when ``max_new_tokens`` ran out first.
    """

    question: str
    reply: str
    stopped_at: str | None
    num_tokens: int

    @property
    def stopped(self) -> bool:
        return self.stopped_at == STOP


@torch.no_grad()
def generate(model, tokenizer, questions: list, *, max_new_tokens: int = 64, do_sample: bool = False,
             temperature: float = 1.0, batch_size: int = 8) -> list[Generation]:
    """Batched answers to ``questions`` (strings, or turn lists ending on a human turn).

    Prompts are ``format_prompt(question)`` (ending in ``###BOT###``), left-padded so every row's last
    prompt token is at the same place and new tokens follow it directly. Generation stops at
    ``###STOP###`` or EOS (both passed as ``eos_token_id``); a base model without the marker stops at EOS.
    """
    stops = stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    extra = [s for s in (tokenizer.eos_token, tokenizer.pad_token) if s]
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "eos_token_id": stops,
              "pad_token_id": pad, "use_cache": True}
    if do_sample:
        kwargs["temperature"] = temperature
    out: list[Generation] = []
    try:
        for start in range(0, len(questions), batch_size):
            chunk = questions[start:start + batch_size]
            enc = tokenizer([format_prompt(q) for q in chunk], return_tensors="pt", padding=True)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            sequences = model.generate(**enc, **kwargs)  # (B, T_prompt + T_new)
            for q, row in zip(chunk, sequences[:, enc["input_ids"].shape[1]:].tolist()):
                end = next((i for i, t in enumerate(row) if t in stops), None)
                new = row if end is None else row[:end]
                text = tokenizer.decode(new, skip_special_tokens=False)
                stopped_at = None if end is None else tokenizer.convert_ids_to_tokens(row[end])
                out.append(Generation(q, extract_reply(text, extra_stops=extra), stopped_at, len(new)))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out


def generate_answers(model, tokenizer, questions: list, *, max_new_tokens: int = 64,
                     do_sample: bool = False) -> list[str]:
    """Just the replies of ``generate`` (for the notebook's base-model vs SAWYER table)."""
    return [g.reply for g in generate(model, tokenizer, questions, max_new_tokens=max_new_tokens,
                                      do_sample=do_sample)]
