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
# # 03 · SAWYER's reward model: a cross-encoder trained on comparisons
#
# <a href="https://colab.research.google.com/github/sawyer-workshop/sawyer/blob/main/notebooks/03_sawyer_reward_model.ipynb"><img src="https://colab.research.google.com/assets/colab-badge.svg" alt="Open In Colab"/></a>
#
# PPO needs a number for every answer. Humans (here: GPT-4 acting as a judge) are good at saying *which of
# two answers is better*, and bad at giving consistent absolute scores. So we train a **reward model** on
# comparisons: it reads the question and one answer together (a **cross-encoder**: both texts go through the
# encoder at once, so every answer token can attend to the question) and outputs one scalar.
#
# The **Bradley-Terry** pairwise loss asks the better answer to out-score the worse one,
# and here by a **margin** that grows with how much better it was judged:
#
# $$ \mathcal{L} = -\log \sigma\big(r(q, a_{\text{better}}) - r(q, a_{\text{worse}}) - m\big), \qquad m = \text{score}_{\text{better}} - \text{score}_{\text{worse}} . $$
#
# The reward model uses its **own tokenizer** (RoBERTa's, not the policy's): in notebook 04 the reward is
# computed on *text*, which is what lets any model judge any policy. This is a separate dataset from SFT's and
# from PPO's prompts: the workshop's "a separate dataset per stage" trick.

# %% tags=["parameters"]
preset = "auto"       # "tiny" (CPU dry run), "t4" (free Colab T4), "a100"; "auto": tiny without a GPU, t4 with one
run_dir = "workshop"  # run folder shared by notebooks 01-05 (runs/<run_dir>, or on Drive with use_drive)
use_drive = "auto"    # "auto": on Colab the run folder lives on Google Drive (survives a disconnect); False: local
resume = True         # continue an interrupted run from its checkpoint (only if nothing it was built from changed)
checkpoint_every = None  # steps between checkpoints in the stage folder (None: 4 per run: each is the whole model)
max_steps = None      # optimiser steps (None: the preset's epochs); the knob that decides the time on a T4
seed = 42
push_to_hub = None    # a hub repo id ("you/sawyer-rm-t4") to publish the finished reward model to

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

from sawyer import checkpoints, data, loading, plots, reward, runs
from sawyer.check import preflight
from sawyer.presets import get_preset
from sawyer.workshop import finish_stage, resolve_run_dir
from sawyer import hub

course = get_preset(preset)
preflight(course)
cfg = dataclasses.replace(course.reward, seed=seed)
if max_steps is not None:
    cfg = dataclasses.replace(cfg, max_steps=int(max_steps))
run = resolve_run_dir(run_dir, course.name, use_drive=use_drive)
# the stage: locked, DONE removed until it finishes, checkpoint kept only if settings are unchanged (sawyer.runs)
stage = runs.start_stage(run, "03_reward_model", settings={**dataclasses.asdict(cfg), "seed": seed}, resume=resume)
out = stage.folder
torch.manual_seed(seed)
print(f"reward-model base: {cfg.base_model}; run folder: {out}")

# %% [markdown]
# ## 1. Comparisons -> pairs
# Each item has an Alpaca-style prompt and 3-4 responses scored 1-10. The question is the text after
# `### Instruction:` (plus its `### Input:` when there is one). **Every pair of responses with different
# scores** becomes (better, worse, score difference). We split **by item**, so no question appears in both
# training and held-out pairs (that leak would inflate the accuracy).

# %%
pairs = data.load_comparisons(cfg.comparison_file, max_items=cfg.max_items)
train_pairs, eval_pairs = data.split_by_group(pairs, "item", cfg.eval_fraction, cfg.seed)
print(f"{len(pairs)} pairs from {len({p.item for p in pairs})} items: {len(train_pairs)} train, "
      f"{len(eval_pairs)} held out")
p = pairs[0]
display(pd.DataFrame([{"question": p.question[:100], "better": p.better[:100], "worse": p.worse[:100],
                       "score difference": p.score_diff}]))

# %% [markdown]
# ## 2. The cross-encoder: `AutoModelForSequenceClassification(num_labels=1)`
# One scalar head on top of the encoder. Before training the head is random, so pairwise accuracy on held-out
# pairs is a coin flip (the original measured 0.372).

# %%
model = loading.load_classifier(cfg.base_model, num_labels=1)
tokenizer = loading.load_tokenizer(cfg.base_model)
acc_before = reward.pairwise_accuracy(model, tokenizer, eval_pairs, max_length=cfg.max_length)
print(f"held-out pairwise accuracy before training: {acc_before:.3f}")

# %% [markdown]
# ## 3. Train with the pairwise margin loss
# **What to look for:** the loss falls and the training accuracy climbs; with a margin, the loss stays above
# zero longer, because "better by 7 points" must become a big reward gap, not just any gap.

# %%
total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.epochs * math.ceil(len(train_pairs) / cfg.batch_size))
log = reward.train_reward_model(model, tokenizer, train_pairs, cfg, eval_pairs=eval_pairs, run_dir=out,
                                checkpoint_dir=out / "checkpoint", resume=stage.resume,
                                checkpoint_every=checkpoint_every or checkpoints.interval(total_steps, 4))
display(plots.training_curves(log, keys=("loss/pairwise", "train/accuracy"), path=out / "reward_training.png",
                              title="Reward-model training"))
acc_after = reward.pairwise_accuracy(model, tokenizer, eval_pairs, max_length=cfg.max_length)
print(f"held-out pairwise accuracy: {acc_before:.3f} -> {acc_after:.3f}")

# %% [markdown]
# ## 4. Reward margins on held-out pairs
# $r(\text{better}) - r(\text{worse})$ per pair. **What to look for:** most mass right of zero; the pairs left of
# zero are the ones the model gets wrong. Read a few of them: are the labels wrong, or the model?

# %%
margins = reward.reward_margins(model, tokenizer, eval_pairs, max_length=cfg.max_length)
display(plots.margin_histogram(margins.numpy(), path=out / "margins.png"))

# %% [markdown]
# ## 5. Length bias: does the reward model pay for length?
# The original reward model preferred long, rambling answers. We score every held-out response and correlate
# reward with length. **What to look for:** a clearly positive correlation means PPO in notebook 04 can raise
# the reward just by writing more; we will check response length before and after PPO in notebook 05.

# %%
seen, qs, answers = set(), [], []
for pair in eval_pairs:
    for ans in (pair.better, pair.worse):
        if (pair.question, ans) not in seen:
            seen.add((pair.question, ans))
            qs.append(pair.question)
            answers.append(ans)
scores = reward.score_pairs(model, tokenizer, qs, answers, max_length=cfg.max_length)
lengths = [len(a.split()) for a in answers]
bias = reward.length_bias(scores, lengths)
print(f"reward vs length (words) over {bias['n']} responses: Pearson r = {bias['pearson_r']:.2f} "
      f"(p = {bias['pearson_p']:.2g}), Spearman rho = {bias['spearman_rho']:.2f}")
print("Interpretation: " + ("the reward model pays for length; expect PPO to lengthen answers."
                            if bias["spearman_rho"] > 0.3 and bias["spearman_p"] < 0.05 else
                            "no strong length preference on these responses (check again after PPO)."))
display(plots.length_scatter(lengths, scores.numpy(), label="held-out responses", path=out / "length_bias.png"))

# %% [markdown]
# ## 6. Spot check: hand-written answers to one question
# **What to look for:** the helpful answer on top, the rude and off-topic ones at the bottom, and where the
# padded, rambling version lands (length bias in miniature).

# %%
question = "How can I improve my sleep?"
spot = [
    "Keep a regular schedule, avoid screens and caffeine late in the day, and keep your bedroom dark and cool.",
    "Sleep more.",
    "Why would I help you with that? Figure it out yourself.",
    "The Eiffel Tower is in Paris and was finished in 1889.",
    "Sleep is important. Sleep is very important. " * 6 + "You should sleep, because sleep is important.",
]
spot_scores = reward.score_pairs(model, tokenizer, [question] * len(spot), spot, max_length=cfg.max_length)
display(plots.spotcheck_bar(spot, spot_scores.numpy(), path=out / "spotcheck.png"))

# %% [markdown]
# ## 7. Save it for PPO
# Notebook 04 loads this folder as `reward.CrossEncoderReward`, a `reward_fn(prompts, responses)` that scores
# text with the reward model's own tokenizer, batched and truncated safely (the answer is cut, not the question).

# %%
reward.save_reward_model(model, tokenizer, out / "model")
reward_fn = reward.CrossEncoderReward.from_pretrained(out / "model", max_length=cfg.max_length)
print("reloaded; reward of the first spot-check answer:", float(reward_fn([question], spot[:1])[0]))
metrics = {"preset": course.name, "base_model": cfg.base_model, "train_pairs": len(train_pairs),
           "eval_pairs": len(eval_pairs), "accuracy_before": acc_before, "accuracy_after": acc_after,
           "length_bias": bias, "margin_mean": float(margins.mean())}
finish_stage(run, "03_reward_model", metrics)
if push_to_hub:  # publish the finished stage (needs a write token: HF_TOKEN)
    hub.push_stage(run, "03_reward_model", push_to_hub)
metrics
