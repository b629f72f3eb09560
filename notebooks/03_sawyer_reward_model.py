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

# %%
from IPython.display import Markdown

from sawyer import evaluation

if banner := evaluation.banner(course.name):  # on `tiny`: say once, visibly, what its numbers can and cannot mean
    display(Markdown(banner))

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
# pairs is a coin flip (the original measured 0.372). transformers says so in its LOAD REPORT: the head's
# `classifier.*` weights are MISSING from the pretrained checkpoint, i.e. newly initialised. Expected, not an error.

# %%
model = loading.load_classifier(cfg.base_model, num_labels=1)
tokenizer = loading.load_tokenizer(cfg.base_model)
acc_before = reward.pairwise_accuracy(model, tokenizer, eval_pairs, max_length=cfg.max_length)
print(f"held-out pairwise accuracy before training: {acc_before:.3f}")

# %% [markdown]
# ## 3. Train with the pairwise margin loss
#
# **Bradley-Terry** (1952) models a judge who prefers answer $a$ over $b$ with probability
#
# $$ P(a \succ b \mid q) = \frac{e^{r(q,a)}}{e^{r(q,a)} + e^{r(q,b)}} = \sigma\big(r(q,a) - r(q,b)\big), $$
#
# so only *differences* of rewards matter (adding a constant to every reward changes nothing). Maximising the
# likelihood of the observed preferences is minimising $-\log\sigma(r(q,a_{\text{better}}) - r(q,a_{\text{worse}}))$,
# the loss of InstructGPT's reward model; the margin $m$ in the equation at the top asks for a gap that grows with
# the judged score difference (Llama-2's variant). Set `margin="none"` in `RewardConfig` for plain Bradley-Terry.
#
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
# reward with length (in **words**). An answer longer than the reward model's token window (`max_length`) is scored
# on a cut-off text, so its reward says nothing about its full length: those are **marked** (red crosses) and
# **left out** of Spearman's rho, which comes with its 95% interval. **What to look for:** a clearly positive rho
# means PPO in notebook 04 can raise the reward just by writing more; we check length again after PPO in notebook 05.

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
truncated = evaluation.truncated_mask(tokenizer, qs, answers, cfg.max_length)
bias = evaluation.length_bias_check(scores.numpy(), lengths, truncated)
print(f"{bias['n_truncated']} of {len(answers)} responses exceed the {cfg.max_length}-token window and were scored "
      f"cut off: left out (with them, rho = {bias['rho_with_truncated']:.2f}).")
print(f"Reward vs length: {bias['verdict']}.")
display(plots.length_scatter(lengths, scores.numpy(), label="held-out responses", unit="words", truncated=truncated,
                             path=out / "length_bias.png"))

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
helpful, padded = float(spot_scores[0]), float(spot_scores[-1])
padded_cut = evaluation.truncated_mask(tokenizer, [question], spot[-1:], cfg.max_length)[0]
print(f"The padded answer scores {padded:.2f}, the helpful one {helpful:.2f}"
      + (" (the padded one was cut at the token window)" if padded_cut else "") + ". "
      + ("The reward model prefers the padding: length bias in miniature, whatever the correlation above says."
         if padded > helpful else "The helpful answer wins this one: no sign of paying for padding here.")
      + f" Held-out rho: {bias['spearman_rho']:.2f} [{bias['ci_low']:.2f}, {bias['ci_high']:.2f}].")

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

# %% [markdown]
# ## Your turn
# **1. Plain Bradley-Terry.** Train a second reward model with `margin="none"` (no score-difference margin) for a
# few steps and compare its held-out accuracy and margins with the one above. Which one separates "better by 1"
# from "better by 7"? (The dry run trains 5 steps; try the preset's full budget on a T4.)

# %%
exercise_steps = 5 if course.name == "tiny" else 100  # <- more steps, closer to a fair comparison
plain_cfg = dataclasses.replace(cfg, margin="none", max_steps=exercise_steps)
plain = loading.load_classifier(cfg.base_model, num_labels=1)
reward.train_reward_model(plain, tokenizer, train_pairs, plain_cfg, progress=False)
plain_margins = reward.reward_margins(plain, tokenizer, eval_pairs, max_length=cfg.max_length)
print(f"margin='none', {exercise_steps} steps: held-out accuracy "
      f"{reward.pairwise_accuracy(plain, tokenizer, eval_pairs, max_length=cfg.max_length):.3f}, mean margin "
      f"{float(plain_margins.mean()):.2f} (with the score-difference margin: {acc_after:.3f}, {float(margins.mean()):.2f})")
del plain

# %% [markdown]
# **2. Fool the reward model.** Write answers that should score badly but might not (flattery, confident nonsense,
# the question repeated back) and see where they land next to the helpful one.

# %%
mine = ["Great question! You are clearly very smart. Sleep is great.",  # <- your answers
        "How can I improve my sleep? How can I improve my sleep?"]
mine_scores = reward.score_pairs(model, tokenizer, [question] * len(mine), mine, max_length=cfg.max_length)
for answer, score in zip(mine, mine_scores.tolist()):
    print(f"{score:6.2f}  {answer}")

# %% [markdown]
# **3. Where it is wrong.** The three held-out pairs with the most negative margin: is the label wrong, or the model?

# %%
worst = margins.argsort()[:3].tolist()
display(pd.DataFrame([{"question": eval_pairs[i].question[:80], "better (label)": eval_pairs[i].better[:100],
                       "worse (label)": eval_pairs[i].worse[:100], "margin": round(float(margins[i]), 2)}
                      for i in worst]))
