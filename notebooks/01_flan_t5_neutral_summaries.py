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
# # 01 · More neutral, more grammatical news summaries with PPO
#
# <a href="https://colab.research.google.com/github/sawyer-workshop/sawyer/blob/main/notebooks/01_flan_t5_neutral_summaries.ipynb"><img src="https://colab.research.google.com/assets/colab-badge.svg" alt="Open In Colab"/></a>
#
# A FLAN-T5 model already writes news summaries. We want them **more grammatical** and **more neutral**,
# but we have no labelled "better summary" data. What we do have are two off-the-shelf text classifiers:
#
# - a CoLA model that scores whether a sentence is grammatically *acceptable*;
# - a sentiment model whose *neutral* logit says how neutral a text sounds.
#
# Their raw logits, added up, are our **reward**: a number for any summary. Reinforcement learning (PPO)
# then nudges the summariser towards text the reward likes, while a KL penalty keeps it close to the
# original model so it keeps summarising. In the original workshop the story was
# "Trump *scrapped* ..." becoming "Trump *announced* ...".
#
# This notebook is a seq2seq policy (T5: the article goes into the encoder, the summary comes out of the
# decoder), the same `sawyer.ppo` that notebook 04 uses for a chat LLM.

# %% tags=["parameters"]
preset = "auto"       # "tiny" (CPU dry run), "t4" (free Colab T4), "a100"; "auto": tiny without a GPU, t4 with one
run_dir = "workshop"  # run folder shared by notebooks 01-05 (runs/<run_dir>, or on Drive with use_drive)
use_drive = "auto"    # "auto": on Colab the run folder lives on Google Drive (survives a disconnect); False: local
resume = True         # continue an interrupted run from its checkpoint (only if nothing it was built from changed)
checkpoint_every = None  # steps between checkpoints in the stage folder (None: about 10 per run)
steps = None          # PPO steps (None: the preset's); the knob that decides the time on a T4
plot_every = 5        # redraw the live reward/KL curves every N steps
seed = 0

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

# %% [markdown]
# The pre-flight check says which GPU we have, which precision we will compute in, and whether this
# preset fits. Read its "to do" lines if it prints any.

# %%
import dataclasses

import pandas as pd
import torch
from IPython.display import clear_output, display

from sawyer import checkpoints, data, evaluation, loading, lora, plots, ppo
from sawyer.check import preflight
from sawyer.presets import get_preset
from sawyer.reward import summary_reward
from sawyer import runs
from sawyer.workshop import finish_stage, resolve_run_dir

course = get_preset(preset)
preflight(course)
cfg = course.summary
if steps is not None:
    cfg = dataclasses.replace(cfg, steps=int(steps))
run = resolve_run_dir(run_dir, course.name, use_drive=use_drive)
# the stage: locked, DONE removed until it finishes, checkpoint kept only if settings are unchanged (sawyer.runs)
stage = runs.start_stage(run, "01_summaries", settings={**dataclasses.asdict(cfg), "seed": seed}, resume=resume,
                         ignore=("steps",))
out = stage.folder
torch.manual_seed(seed)
print(f"run folder: {out}")

# %% [markdown]
# ## 1. The reward: two classifiers, read on raw logits
#
# $$ r(\text{summary}) = 1.0 \cdot \text{logit}_{\text{CoLA}}(\text{acceptable}) + 0.5 \cdot \text{logit}_{\text{sentiment}}(\text{neutral}) $$
#
# Labels are picked **by name** (`LABEL_1` is "acceptable" for CoLA and "neutral" for the sentiment model),
# so a model with another label order fails loudly instead of rewarding the wrong thing. Raw logits, not
# probabilities: a probability saturates at 1 and stops giving the policy a gradient to climb.
#
# **What to look for:** the grammatical, neutral sentence should score highest; the shuffled one low on CoLA;
# the angry one low on "neutral". (With the `tiny` preset the classifiers are tiny models trained for seconds,
# so the ranking is rough; on `t4` they are the real ones.)

# %%
reward_fn = summary_reward(cfg)
examples = [
    "The government announced a new budget on Monday.",
    "budget Monday the new announced a government on.",
    "The furious minister slammed the disastrous plan as the worst crisis ever.",
    "Fans celebrated a great record win for the team.",
]
parts = reward_fn.breakdown(examples)
display(pd.DataFrame({"sentence": examples, **{k: v.numpy().round(2) for k, v in parts.items()},
                      "reward": reward_fn([""] * len(examples), examples).numpy().round(2)}))

# %% [markdown]
# ## 2. Data: news articles, prompted as `"summarize: " + text`
# Training texts come from the train split; the before/after comparison uses **held-out** test texts of
# 200-450 characters, as the original did.

# %%
train_texts = data.load_news(cfg.dataset, split="train", n=cfg.n_train)
test_texts = data.filter_by_chars(data.load_news(cfg.dataset, split="test"), cfg.test_min_chars,
                                  cfg.test_max_chars)[: cfg.n_test]
train_prompts = [cfg.prompt_prefix + t for t in train_texts]
test_prompts = [cfg.prompt_prefix + t for t in test_texts]
print(f"{len(train_prompts)} training prompts, {len(test_prompts)} held-out test prompts")
print(train_prompts[0][:300])

# %% [markdown]
# ## 3. The policy: FLAN-T5 with LoRA
# LoRA trains two small matrices per linear layer ($W + BA$, rank $r$) and leaves the base weights frozen.
# That matters twice for PPO: few trainable parameters, and a free **reference model**: switching the adapter
# off gives back the original model, so we never hold a second copy in memory.

# %%
tokenizer = loading.load_tokenizer(cfg.policy)
base = loading.load_seq2seq_lm(cfg.policy, load_in_4bit=cfg.load_in_4bit)
policy = lora.add_lora(base, lora.lora_config(base, r=cfg.lora_r, alpha=cfg.lora_alpha, targets="all-linear"))
print(lora.format_summary(policy))

# %% [markdown]
# ## 4. Before training: summaries of the held-out texts
# Greedy decoding, so "before" and "after" differ only because the model changed.

# %%
gen_kwargs = dict(max_new_tokens=cfg.ppo.max_new_tokens, batch_size=16, do_sample=False)
before = evaluation.generate(policy, tokenizer, test_prompts, **gen_kwargs)
before_parts = reward_fn.breakdown(before)
print(before[:3])

# %% [markdown]
# ## 5. PPO, in the open
#
# Each step: **rollout** (sample a summary for 8 prompts), **score** (the reward above), **update**.
# The update maximises the KL-penalised reward
#
# $$ \max_\pi \; \mathbb{E}_{x, y\sim\pi}\big[r(x, y)\big] - \beta\, \mathrm{KL}\big(\pi(\cdot|x)\,\|\,\pi_{\text{ref}}(\cdot|x)\big), $$
#
# paid per token as $-\beta(\log\pi(y_t) - \log\pi_{\text{ref}}(y_t))$, with the classifier score added on the
# last token. PPO's clipped objective $\min(\rho A, \operatorname{clip}(\rho, 1-\epsilon, 1+\epsilon) A)$ with
# $\rho = \pi_\theta/\pi_{\text{old}}$ stops any one batch from moving the policy far: without the clip, one lucky
# sample could drag the model into gibberish that happens to fool a classifier.
#
# **What to look for:** `objective/score` should trend up; `objective/kl` rises from 0 as the policy moves
# away from the reference. A KL shooting up while the score jumps is the first sign of reward hacking.

# %%
state = ppo.setup(policy, tokenizer, dataclasses.replace(cfg.ppo, seed=seed), run_dir=out)
if stage.resume and checkpoints.has_checkpoint(out / "checkpoint"):  # an interrupted run: continue it exactly
    checkpoints.load_checkpoint(state, out / "checkpoint")
    print(f"resumed at step {state.step}")
history = runs.read_log(out / "ppo_log.jsonl", max_step=state.step)
every = checkpoint_every or checkpoints.interval(cfg.steps)
for step in range(state.step, cfg.steps):
    prompts = checkpoints.prompt_batch(train_prompts, step, cfg.ppo.batch_size, seed)
    batch = ppo.rollout(state, prompts)                # 1. sample summaries (+ log-probs, reference, values)
    scores = ppo.score(state, batch, reward_fn)        # 2. the classifiers' reward, on text
    stats = ppo.update(state, batch, scores)           # 3-6. KL penalty, GAE, clipped PPO update
    history.append(stats)
    if state.step % every == 0 or state.step == cfg.steps:
        checkpoints.save_checkpoint(state, out / "checkpoint")
    if (step + 1) % plot_every == 0 or step + 1 == cfg.steps:
        clear_output(wait=True)
        print(f"step {step + 1}/{cfg.steps}: score {stats['objective/score']:.3f}, KL {stats['objective/kl']:.3f}")
        display(plots.training_curves(history, keys=("objective/score", "objective/kl"),
                                      path=out / "training_curves.png"))
policy.save_pretrained(out / "adapter")

# %% [markdown]
# Did the reward on the **training prompts** rise? We compare the first and last quarter of the run
# (single steps are noisy: each is only one batch of prompts).

# %%
k = max(1, len(history) // 4)
first = sum(h["objective/score"] for h in history[:k]) / k
last = sum(h["objective/score"] for h in history[-k:]) / k
print(f"mean training score, first {k} step(s): {first:.3f}; last {k} step(s): {last:.3f} ({last - first:+.3f})")

# %% [markdown]
# ## 6. After training: the same held-out texts
# The same prompts, greedy decoding, paired by text: the Wilcoxon signed-rank test asks whether the
# per-text differences are centred on zero. **What to look for:** the CoLA and neutral means, their
# confidence intervals, and whether the box plot really moved or only its outliers did.

# %%
after = evaluation.generate(policy, tokenizer, test_prompts, **gen_kwargs)
after_parts = reward_fn.breakdown(after)
results = {}
for name in before_parts:
    results[name] = evaluation.compare(before_parts[name].numpy(), after_parts[name].numpy(), paired=True,
                                       n_resamples=course.eval.bootstrap_samples, seed=seed)
    print(evaluation.describe_change(f"{name} logit", results[name]))
display(evaluation.summary_table({f"{n} {when}": v[n].numpy() for n in before_parts
                                  for when, v in (("before", before_parts), ("after", after_parts))}))
display(plots.reward_boxplot({f"{n}\n{when}": v[n].numpy() for n in before_parts
                              for when, v in (("before", before_parts), ("after", after_parts))},
                             path=out / "reward_boxplot.png", title="Classifier logits on held-out texts"))

# %% [markdown]
# Side by side: the original model's summary and the aligned one.

# %%
pd.set_option("display.max_colwidth", 120)
display(pd.DataFrame({"text": [t[:120] + "..." for t in test_texts], "original": before, "aligned": after}).head(8))

# %% [markdown]
# ## 7. Which words changed?
# The words whose frequency moved most between the original and aligned summaries: the "scrapped" ->
# "announced" story of the original workshop, computed here rather than hand-picked.

# %%
shift = plots.word_frequency_shift(before, after, top=10)
display(pd.DataFrame(shift, columns=["word", "rate before", "rate after"]))
display(plots.word_shift_bars(shift, path=out / "word_shift.png"))

# %% [markdown]
# ## Where this can go wrong
# - **Reward hacking.** The policy optimises the classifiers, not "quality". Short, bland sentences are very
#   grammatical and very neutral; watch `response/length` and read the summaries, not only the scores.
# - **The KL coefficient** is the leash: too small and the summaries drift into classifier bait; too large
#   and nothing changes. The adaptive controller steers the KL towards a target (6 nats per summary here).
# - **Small evaluations lie.** With a few dozen texts, look at the confidence interval before the mean.

# %%
metrics = {
    "preset": course.name, "steps": cfg.steps,
    "train_score_first": first, "train_score_last": last,
    **{f"{n}_mean_before": float(before_parts[n].mean()) for n in before_parts},
    **{f"{n}_mean_after": float(after_parts[n].mean()) for n in after_parts},
    **{f"{n}_median_before": float(before_parts[n].median()) for n in before_parts},
    **{f"{n}_median_after": float(after_parts[n].median()) for n in after_parts},
    **{f"{n}_wilcoxon_p": results[n]["wilcoxon"]["p"] for n in results},
    "final_kl": history[-1]["objective/kl"],
}
finish_stage(run, "01_summaries", metrics)
metrics
