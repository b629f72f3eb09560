# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · SAWYER SFT: teach a raw base LLM to hold a conversation
#
# <a href="https://colab.research.google.com/github/sawyer-workshop/sawyer/blob/main/notebooks/02_sawyer_sft.ipynb"><img src="https://colab.research.google.com/assets/colab-badge.svg" alt="Open In Colab"/></a>
#
# A **base** model (not an instruct model, on purpose) only continues documents: ask it a question and it
# may answer, or write three more questions, or a forum thread. Supervised fine-tuning (SFT) on
# conversations teaches it a *format*: a human turn, an assistant turn, and, crucially, **when to stop**.
#
# Four tricks from the workshop live here:
# 1. a **chat template** with three new marker tokens `###HUMAN###`, `###BOT###`, `###STOP###`;
# 2. **manual embedding initialisation** of those tokens (LoRA cannot learn a brand-new embedding from scratch
#    in a few hundred steps, so we start each one at the mean embedding of a phrase that means the same thing);
# 3. **QLoRA**: the base in 4-bit NF4, small trainable LoRA adapters on top;
# 4. **completion-only loss**: the model is graded only on the final assistant reply and its `###STOP###`.

# %% tags=["parameters"]
preset = "auto"       # "tiny" (CPU dry run), "t4" (free Colab T4), "a100"; "auto": tiny without a GPU, t4 with one
run_dir = "workshop"  # run folder shared by notebooks 01-05 (runs/<run_dir>, or on Drive with use_drive)
use_drive = "auto"    # "auto": on Colab the run folder lives on Google Drive (survives a disconnect); False: local
resume = True         # continue an interrupted run from its checkpoint (only if nothing it was built from changed)
checkpoint_every = None  # steps between checkpoints in the stage folder (None: about 10 per run)
max_steps = None      # SFT optimiser steps (None: the preset's); the knob that decides the time on a T4
seed = 42
push_to_hub = None    # a hub repo id ("you/sawyer-sft-t4") to publish the finished adapter to (write token)

# %% [markdown]
# ## 0. Set-up
# On Colab, the next cell clones the course and installs the few pinned libraries Colab lacks
# (`requirements-colab.txt`: a few minutes on a fresh VM, instant after). It never replaces Colab's own
# numpy, pandas or torch; if a library Colab had already loaded must change, it restarts the runtime itself
# and says so: then run all cells again.

# %%
import os, subprocess, sys  # noqa: E401

if "google.colab" in sys.modules:  # Colab: clone the course once per VM, install only what Colab lacks
    if not os.path.isdir("/content/sawyer"):
        subprocess.run(["git", "clone", "-q", "--depth", "1", "https://github.com/sawyer-workshop/sawyer",
                        "/content/sawyer"], check=True)
    sys.path.insert(0, "/content/sawyer")
    from sawyer.colab_install import colab_install

    colab_install("/content/sawyer/requirements-colab.txt")  # minutes on a fresh VM, instant after that

# %%
import dataclasses
import math

import pandas as pd
import torch
from IPython.display import display

from sawyer import chat, checkpoints, data, plots, runs, sft, tokens
from sawyer.check import hub_login, preflight
from sawyer.presets import get_preset
from sawyer.workshop import finish_stage, resolve_run_dir
from sawyer import hub

course = get_preset(preset)
preflight(course)
hub_login(course)  # only when the preset's base model is gated (Meta-Llama-3-8B on a100)
cfg = course.sft
if max_steps is not None:
    cfg = dataclasses.replace(cfg, max_steps=int(max_steps))
run = resolve_run_dir(run_dir, course.name, use_drive=use_drive)
# the stage: locked, DONE removed until it finishes, checkpoint kept only if settings are unchanged (sawyer.runs)
stage = runs.start_stage(run, "02_sft", settings={**dataclasses.asdict(cfg), "seed": seed}, resume=resume)
out = stage.folder
torch.manual_seed(seed)
print(f"base model: {cfg.base_model}; run folder: {out}")

# %%
from IPython.display import Markdown

from sawyer import evaluation

if banner := evaluation.banner(course.name):  # on `tiny`: say once, visibly, what its numbers can and cannot mean
    display(Markdown(banner))

# %% [markdown]
# ## 1. The conversation template
# Each turn renders as `###HUMAN### {message} ` or `###BOT### {message} `. A **prompt** for generation ends
# with `###BOT###` (the model's cue to speak); a **finished** conversation ends with `###STOP###`, which is
# what the model must learn to emit when it is done.

# %%
example = [("human", "hi"), ("bot", "sup")]
print(chat.format_conversation(example))
print(chat.format_prompt([("human", "What is the capital of France?")]))

# %% [markdown]
# ## 2. Data: guanaco conversations
# `### Human: ... ### Assistant: ...` transcripts are parsed into turns. Conversations that **end on a human
# turn** would have no assistant reply to learn from (the original trained such rows with every label masked),
# so they are trimmed to their last assistant turn, or dropped if none is left. We count both.

# %%
conversations, load_stats = data.load_conversations(cfg.datasets, max_rows=cfg.max_rows)
display(pd.DataFrame(load_stats).T)
train_convs, eval_convs = data.split(conversations, cfg.eval_fraction, cfg.seed)
print(f"{len(train_convs)} training and {len(eval_convs)} evaluation conversations (split {1 - cfg.eval_fraction:.0%}"
      f"/{cfg.eval_fraction:.0%}, seed {cfg.seed})")

# %% [markdown]
# ## 3. The model: 4-bit base, three new tokens, LoRA
# `prepare_sawyer_model` loads the base (4-bit NF4 when the preset asks), adds the markers, initialises each new
# row of the **input embeddings and of the output layer** (`lm_head`, which Llama-3 does not tie to the input
# embeddings) to the mean of its phrase's embeddings, then attaches LoRA. The original set only the input rows
# and left the output rows at their resize default: the model could read `###STOP###` but had no sensible way
# to *predict* it.
#
# **"LoRA cannot train embeddings"** (the slide) is true of LoRA's low-rank matrices: they sit on linear layers,
# not on the embedding table. Here the three marker rows (input and output) are made trainable *as rows*
# (PEFT's `trainable_token_indices`), next to LoRA: the phrase-mean start is a good first guess, and training
# refines only those rows, never the rest of the vocabulary.
#
# If transformers prints that "the new embeddings will be initialized from a multivariate normal distribution":
# that is `resize_token_embeddings` filling the new rows *before* our initialisation; the next line overwrites
# them with the phrase means (the table below shows which phrase each marker starts from).

# %%
model, tokenizer, marker_ids = sft.prepare_sawyer_model(cfg)
display(pd.DataFrame([{"marker": m, "id": i, "initialised from": cfg.phrases[m]} for m, i in marker_ids.items()]))

# %% [markdown]
# ## 4. Completion-only labels
# Each conversation becomes `prompt + completion`, where the completion is the last assistant reply plus
# `###STOP###`. Labels are `-100` (ignored by the loss) over the prompt. Sequences longer than the limit are
# **dropped, not truncated**: truncation would cut off exactly the reply and the stop token we want to teach.
#
# **What to look for:** the window around the *last* `###BOT###`, where masking stops: every token up to and
# including that marker has no label (the prompt, earlier turns included); the reply after it and `###STOP###` do.

# %%
train_examples, train_stats = sft.build_examples(train_convs, tokenizer, cfg.max_seq_len)
eval_examples, eval_stats = sft.build_examples(eval_convs, tokenizer, cfg.max_seq_len)
print(f"train: {train_stats}; eval: {eval_stats} (max {cfg.max_seq_len} tokens)")
ex = train_examples[0]
bot_id = tokenizer.convert_tokens_to_ids(chat.BOT)
last_bot = max(i for i, t in enumerate(ex["input_ids"]) if t == bot_id)
window = range(max(0, last_bot - 8), min(len(ex["input_ids"]), last_bot + 10))
display(pd.DataFrame({"token": tokenizer.convert_ids_to_tokens([ex["input_ids"][i] for i in window]),
                      "trained on": [ex["labels"][i] != sft.IGNORE_INDEX for i in window]}, index=list(window)).T)
n_trained = sum(label != sft.IGNORE_INDEX for label in ex["labels"])
print(f"{n_trained} of {len(ex['labels'])} tokens carry a label: the last reply and ###STOP###, after position {last_bot}")

# %% [markdown]
# ## 5. Before SFT: the base model
# The same questions, greedy decoding. **What to look for:** the base model does not know the format; it
# rarely emits `###STOP###` and runs until the token limit.
#
# On the offline `cpu` preset the base is SmolLM2-135M-**Instruct**: already chat-tuned in its own format
# (`<|im_start|>user ... <|im_end|>`), so it answers questions before SFT, a weaker "raw base" story than
# Llama-3-8B. What it has never seen are the SAWYER markers: it does not stop with `###STOP###`.

# %%
questions = [chat.trim_to_last_bot(c)[:-1] for c in eval_convs[:6]]
reply_tokens = 128  # guanaco's answers run 40-80 tokens: a smaller budget would cut off a model that does stop
before = sft.generate(model, tokenizer, questions, max_new_tokens=reply_tokens)
display(pd.DataFrame({"question": [q[-1][1][:80] for q in questions], "base model": [g.reply[:120] for g in before],
                      "stopped with ###STOP###": [g.stopped for g in before]}))

# %% [markdown]
# ## 6. Train
# AdamW at lr 2e-4 with a cosine schedule and 10% warm-up, LoRA on the preset's targets, the marker rows
# trainable too. The eval loss is measured on the assistant replies only, before and after.

# %%
total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(
    cfg.epochs * math.ceil(len(train_examples) / cfg.batch_size) / cfg.gradient_accumulation_steps)
result = sft.train_sft(model, tokenizer, train_examples, eval_examples, cfg, output_dir=out / "trainer",
                       save_steps=checkpoint_every or checkpoints.interval(total_steps),
                       resume_from_checkpoint=stage.resume)  # True: continue from the last checkpoint-N, if any
print(f"eval loss {result['eval_loss_before']:.3f} -> {result['eval_loss_after']:.3f} in {result['steps']} steps")
losses = [{"step": r["step"], "loss/train": r["loss"]} for r in result["log_history"] if "loss" in r]
display(plots.training_curves(losses, keys=("loss/train",), path=out / "sft_loss.png", title="SFT training loss"))

# %% [markdown]
# ## 7. After SFT: base model vs SAWYER
# **What to look for:** SAWYER answers in the format and stops at `###STOP###`.

# %%
after = sft.generate(model, tokenizer, questions, max_new_tokens=reply_tokens)
display(pd.DataFrame({"question": [q[-1][1][:80] for q in questions],
                      "base model": [g.reply[:120] for g in before], "base stopped": [g.stopped for g in before],
                      "SAWYER": [g.reply[:120] for g in after], "SAWYER stopped": [g.stopped for g in after]}))
stop_before = sum(g.stopped for g in before) / len(before)
stop_after = sum(g.stopped for g in after) / len(after)
print(f"replies ending in ###STOP###: base {stop_before:.0%}, SAWYER {stop_after:.0%}")

# %% [markdown]
# ## 8. Save only what changed
# The original saved the resized embedding matrices with the adapter: 2.3 GB. We save the LoRA weights and
# the **three marker rows** (input and output), plus the tokenizer: compare that with the full matrices.

# %%
adapter_dir = out / "adapter"
adapter_bytes = tokens.save_adapter(model, tokenizer, adapter_dir)
emb = model.get_base_model().get_input_embeddings().weight
matrices_bytes = 2 * emb.shape[0] * emb.shape[1] * 2  # input + output matrix in 16-bit
print(f"adapter folder: {tokens.format_bytes(adapter_bytes)}; the two embedding matrices alone would be "
      f"{tokens.format_bytes(matrices_bytes)} in 16-bit")

# %% [markdown]
# ## 9. Reload it
# `load_adapter` loads the base, resizes its vocabulary, restores the marker rows and attaches the adapter:
# this is how notebooks 04, 05 and the chat app get SAWYER back.

# %%
reloaded, reloaded_tok = tokens.load_adapter(cfg.base_model, adapter_dir, load_in_4bit=cfg.load_in_4bit)
again = sft.generate(reloaded, reloaded_tok, questions[:2], max_new_tokens=reply_tokens)
print("same replies after reload:", [g.reply for g in again] == [g.reply for g in after[:2]])
del reloaded

# %%
metrics = {"preset": course.name, "base_model": cfg.base_model, "train_examples": len(train_examples),
           "eval_examples": len(eval_examples), "filtered_too_long": train_stats.get("too_long", 0)
           + eval_stats.get("too_long", 0), "eval_loss_before": result["eval_loss_before"],
           "eval_loss_after": result["eval_loss_after"], "steps": result["steps"],
           "stop_rate_before": stop_before, "stop_rate_after": stop_after,
           "adapter_bytes": adapter_bytes, "embedding_matrices_bytes": matrices_bytes}
finish_stage(run, "02_sft", metrics)
if push_to_hub:  # publish the finished stage (needs a write token: HF_TOKEN)
    hub.push_stage(run, "02_sft", push_to_hub)
metrics

# %% [markdown]
# ## Your turn
# **1. Ask SAWYER your own question.** Change the text and run the cell: does it answer in the format, and stop?

# %%
my_question = "What should I pack for a weekend hike?"  # <- your question
mine = sft.generate(model, tokenizer, [my_question], max_new_tokens=64)[0]
print(f"SAWYER: {mine.reply}\n(stopped with ###STOP###: {mine.stopped})")

# %% [markdown]
# **2. What the mask saves.** Without completion-only masking the loss would also grade the *prompt*: the model
# would spend its capacity learning to write human turns. How many tokens would the loss see then?

# %%
graded = sum(sum(label != sft.IGNORE_INDEX for label in e["labels"]) for e in train_examples)
total = sum(len(e["labels"]) for e in train_examples)
print(f"completion-only: {graded:,} of {total:,} training tokens graded ({graded / total:.0%}); "
      f"without the mask all {total:,} would be")

# %% [markdown]
# **3. Temperature.** Greedy decoding always gives the same reply; sampling does not. Sample the same question
# three times at `temperature = 0.7`, then at 1.5: where does the format start to break?

# %%
temperature = 0.7  # <- try 1.5
for g in sft.generate(model, tokenizer, [my_question] * 3, max_new_tokens=48, do_sample=True, temperature=temperature):
    print("-", g.reply[:150], "| stopped:", g.stopped)
