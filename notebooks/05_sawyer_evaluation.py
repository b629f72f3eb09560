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
# # 05 · What did RL change, and what did it not? An honest evaluation
#
# <a href="https://colab.research.google.com/github/sawyer-workshop/sawyer/blob/main/notebooks/05_sawyer_evaluation.ipynb"><img src="https://colab.research.google.com/assets/colab-badge.svg" alt="Open In Colab"/></a>
#
# Three models, one base: the **base** model, **SFT** (notebook 02) and **SFT+PPO** (notebook 04), compared on
# the held-out prompts PPO never trained on. Two questions:
#
# 1. Did PPO raise the reward, by how much, and is that more than chance? (Distributions, paired tests, a
#    confidence interval, an effect size; every number computed here, none typed in.)
# 2. Did PPO change what the model *knows*? Multiple-choice benchmarks (TruthfulQA mc1, MMLU world religions)
#    say no: RL changes style, not knowledge. In the original workshop accuracy even dropped (TruthfulQA
#    0.329 -> 0.222, world religions 0.772 -> 0.702).

# %% tags=["parameters"]
preset = "auto"       # "tiny" (CPU dry run), "t4" (free Colab T4), "a100"; "auto": tiny without a GPU, t4 with one
run_dir = "workshop"  # the run folder of notebooks 02-04 (runs/<run_dir>, or on Drive with use_drive)
use_drive = "auto"    # "auto": on Colab the run folder lives on Google Drive (as in 01-04); False: local
max_questions = None  # per benchmark (None: the preset's); the knob that decides the time on a T4
seed = 0
resume = True         # accepted like 01-04's (05 trains nothing: it always evaluates afresh)
sft_from_hub = None   # hub repo ids of finished stages 02 / 03 / 04, for a run folder that lacks them
reward_model_from_hub = None
ppo_from_hub = None

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
import contextlib
import dataclasses
import json

import pandas as pd
import torch
from IPython.display import display

from sawyer import chat, data, evaluation, plots, runs, tokens
from sawyer.check import hub_login, preflight
from sawyer.presets import get_preset
from sawyer.reward import CrossEncoderReward
from sawyer.workshop import finish_stage, resolve_run_dir

course = get_preset(preset)
preflight(course)
hub_login(course)
cfg = course.eval
if max_questions is not None:
    cfg = dataclasses.replace(cfg, max_questions=int(max_questions))
run = resolve_run_dir(run_dir, course.name, use_drive=use_drive)
from sawyer import hub  # noqa: E402
hub.pull_stages(run, {"02_sft": sft_from_hub, "03_reward_model": reward_model_from_hub,
                      "04_ppo": ppo_from_hub})
# the stage: locked, DONE removed until it finishes, built from the 02/03/04 outputs it records (sawyer.runs)
stage = runs.start_stage(run, "05_evaluation", settings={**dataclasses.asdict(cfg), "seed": seed}, resume=False,
                         needs=("02_sft", "03_reward_model", "04_ppo"))
out = stage.folder
torch.manual_seed(seed)
print(f"run folder: {out}")

# %%
from IPython.display import Markdown

from sawyer import textstats

if banner := evaluation.banner(course.name):  # on `tiny`: say once, visibly, what its numbers can and cannot mean
    display(Markdown(banner))

# %% [markdown]
# ## 1. Three models on one copy of the base weights
# The SFT and PPO adapters are loaded side by side on the same base model; switching adapters switches model,
# and switching them off gives the base model back (with the marker rows at their phrase-mean start).

# %%
model, tokenizer = tokens.load_adapter(course.sft.base_model, run / "02_sft" / "adapter",
                                       load_in_4bit=course.ppo.load_in_4bit)
model.load_adapter(str(run / "04_ppo" / "adapter"), adapter_name="ppo")


@contextlib.contextmanager
def use(name):
    """Run the block as the base model, SFT, or SFT+PPO."""
    if name == "base":
        with model.disable_adapter():
            yield
    else:
        model.set_adapter({"sft": "default", "ppo": "ppo"}[name])
        yield


MODELS = ("base", "sft", "ppo")
test_prompts = json.loads((run / "04_ppo" / "test_prompts.json").read_text())[: cfg.n_test]
print(f"{len(test_prompts)} held-out prompts")

# %% [markdown]
# ## 2. Answers and rewards
# Each model answers every held-out prompt `cfg.samples_per_prompt` times (sampling at temperature 0.7 from a
# fixed seed, so the run reproduces); the reward model scores every answer. One row per answer goes to
# `05_evaluation/eval_rewards.jsonl`. The statistics below compare each prompt's **mean** reward over its
# samples: with one answer per prompt, a confident reward model (scores piled at its two extremes) turns every
# prompt into a coin flip, and that noise, not the models, would decide the test.

# %%
reward_fn = CrossEncoderReward.from_pretrained(run / "03_reward_model" / "model",
                                               max_length=course.reward.max_length,
                                               question_from_prompt=chat.question_from_prompt)
held_out = evaluation.answer_held_out(model, tokenizer, test_prompts, reward_fn, use, MODELS,
                                      samples=cfg.samples_per_prompt, max_new_tokens=cfg.max_new_tokens,
                                      batch_size=cfg.batch_size, stop_token_ids=chat.stop_token_ids(tokenizer),
                                      extract=chat.extract_reply, seed=cfg.seed)
held_out.write_jsonl(out / "eval_rewards.jsonl")
answers, rewards, lengths = held_out.answers, held_out.rewards, held_out.lengths  # per prompt
print(f"{len(test_prompts)} prompts x {held_out.samples} answer(s) per model")
display(pd.DataFrame({"prompt": [chat.question_from_prompt(p)[:60] for p in test_prompts],
                      **{name: [a[:80] for a in answers[name]] for name in MODELS}}).head(5))

# %% [markdown]
# ## 2b. One question, three models
# The workshop's central slide: the same question to the base model, SFT and SFT+RL, side by side, with the reward
# of each answer. Greedy decoding, so the answers differ only because the models do. **What to look for:** the base
# model rambles or leaves the format, SFT answers and stops, SFT+RL answers in the style the reward model likes
# (read it: better, or only longer?).

# %%
showcase = ["What is the capital of France?", "How can I improve my sleep?",
            "Explain what a neural network is to a ten-year-old.", "Write a haiku about autumn.",
            "Should I learn Python or JavaScript first?"]
showcase_prompts = [chat.format_prompt([("human", q)]) for q in showcase]


def three_models(prompts):
    """Greedy answers of base, SFT and SFT+PPO to ``prompts`` and the reward model's score of each."""
    rows = {}
    for name in MODELS:
        with use(name):
            replies = evaluation.generate(model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens,
                                          batch_size=cfg.batch_size, stop_token_ids=chat.stop_token_ids(tokenizer),
                                          progress=False)
        replies = [chat.extract_reply(a) for a in replies]
        rows[name] = replies
        rows[f"{name} reward"] = reward_fn(prompts, replies).numpy().round(2)
    return pd.DataFrame(rows, index=[chat.question_from_prompt(p) for p in prompts])


with pd.option_context("display.max_colwidth", 200):
    display(three_models(showcase_prompts))

# %% [markdown]
# **Ask your own question** (change the text and run the cell again):

# %%
my_question = "What is a good way to start running?"  # <- your question
with pd.option_context("display.max_colwidth", 300):
    display(three_models([chat.format_prompt([("human", my_question)])]).T)

# %% [markdown]
# **The vibe check: chat with SAWYER in Streamlit.** The app (`sawyer/app.py`) loads the base model with an adapter
# once and keeps the conversation. From a terminal in the course folder, with the paths this run used:
#
# ```bash
# streamlit run sawyer/app.py -- --base <base model> --adapter <run folder>/04_ppo/adapter
# ```
#
# On **Colab** there is no terminal to open a port from: the next cell starts the app in the background and prints
# a link through Colab's port proxy (`google.colab.kernel.proxyPort`). Use a T4 runtime and stop the app
# (`app.terminate()`) before training again, as it holds its own copy of the model in GPU memory.

# %%
import subprocess  # noqa: E402
import sys  # noqa: E402

from sawyer.notebooks import REPO_ROOT  # noqa: E402

app_cmd = [sys.executable, "-m", "streamlit", "run", str(REPO_ROOT / "sawyer" / "app.py"), "--server.port",
           "8501", "--server.headless", "true", "--", "--base", course.sft.base_model,
           "--adapter", str(run / "04_ppo" / "adapter")] + (["--load-in-4bit"] if course.ppo.load_in_4bit else [])
print(" ".join(app_cmd[2:]))
if "google.colab" in sys.modules:
    from google.colab.output import eval_js  # type: ignore[import-not-found]

    app = subprocess.Popen(app_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    print("open the chat:", eval_js("google.colab.kernel.proxyPort(8501)"))

# %% [markdown]
# ## 3. Reward distributions
# **What to look for:** the whole box moving, not only the mean. In the original, PPO raised the mean
# (5.70 -> 6.92) and, tellingly, shrank the spread (std 3.52 -> 1.86): fewer bad answers, not only better ones.

# %%
display(evaluation.summary_table(rewards).round(3))
display(plots.reward_boxplot(rewards, path=out / "reward_boxplot.png"))
display(plots.reward_histograms(rewards, path=out / "reward_histograms.png"))

# %% [markdown]
# ### Next to the reward: what else moved?
# The original workshop measured question-answer similarity next to the reward. Here: length, **distinct-n**
# (unique word n-grams / all n-grams across the answers: falls when a model repeats the phrases the reward likes),
# **repetition** within an answer, the share of **empty** answers, and a lexical **relevance** to the question.
# **What to look for:** a reward gain that comes with falling relevance or diversity is reward hacking.

# %%
questions_text = [chat.question_from_prompt(p) for p in test_prompts]
every_question = [questions_text[i] for i in held_out.prompt_ids]  # one per answer, all samples
secondary = textstats.metrics_table(held_out.all_answers, prompts=every_question)
secondary.insert(0, "reward mean", [float(rewards[n].mean()) for n in secondary.index])
display(secondary.round(3))

# %% [markdown]
# ## 4. Is the change real?
# The same prompts were answered by every model, so the right test is **paired**: the Wilcoxon signed-rank test
# on per-prompt differences. Mann-Whitney U (unpaired, as the original reported) is shown too. The bootstrap
# gives a 95% confidence interval for the mean difference; the effect size says how big it is in units of
# the differences' spread (Cohen's $d_z$; 0.2 small, 0.5 medium, 0.8 large).

# %%
comparisons = {"SFT vs base": ("base", "sft"), "PPO vs SFT": ("sft", "ppo"), "PPO vs base": ("base", "ppo")}
tests = {}
for label, (a, b) in comparisons.items():
    tests[label] = evaluation.compare(rewards[a], rewards[b], paired=True, n_resamples=cfg.bootstrap_samples,
                                      seed=cfg.seed)
    print(f"{label}: " + evaluation.describe_change("reward", tests[label]))
display(pd.DataFrame({label: {"mean diff": t["bootstrap"]["diff"], "CI low": t["bootstrap"]["ci_low"],
                              "CI high": t["bootstrap"]["ci_high"], "Wilcoxon p": t["wilcoxon"]["p"],
                              "Mann-Whitney p": t["mann_whitney"]["p"], "Cohen's d_z": t["effect_size"]["cohens_d"]}
                      for label, t in tests.items()}).T.round(4))

# %% [markdown]
# ## 5. Reward vs length, before and after PPO
# Notebook 03 measured how much the reward model pays for length. If PPO "improved" mostly by writing more,
# the reward gain is partly a length gain. **What to look for:** the mean length column, and whether the
# correlation is strong for the PPO model.

# %%
truncated = {name: evaluation.truncated_mask(reward_fn.tokenizer, every_question, held_out.all_answers[name],
                                             reward_fn.max_length)
             for name in MODELS}  # scored cut off by the reward model: left out of rho
bias = {name: evaluation.length_bias_check(held_out.all_rewards[name], held_out.all_lengths[name], truncated[name])
        for name in MODELS}
display(pd.DataFrame({name: {"mean length (words)": sum(lengths[name]) / len(lengths[name]),
                             "truncated": bias[name]["n_truncated"], "Spearman rho": bias[name]["spearman_rho"],
                             "95% CI low": bias[name]["ci_low"], "95% CI high": bias[name]["ci_high"],
                             "p": bias[name]["spearman_p"]} for name in MODELS}).T.round(3))
print(f"SFT+PPO answers: {bias['ppo']['verdict']}.")
display(plots.length_scatter(held_out.all_lengths["ppo"], held_out.all_rewards["ppo"], label="SFT+PPO answers",
                             unit="words", truncated=truncated["ppo"], path=out / "length_ppo.png"))

# %% [markdown]
# ## 6. What RL does not change: knowledge
# Multiple-choice questions, scored two ways:
# - **log-likelihood**: the model's probability of each choice after the question; the most probable choice
#   is the answer (no free text, so no answer-parsing failures);
# - **letter answer** (the original's protocol): the choices listed as A, B, C, D and the model's probability
#   of each letter as the next token.
#
# The error bars are 95% Wilson intervals: with a few dozen questions they are wide, so small differences mean
# nothing. The dashed line is **chance** (1 / number of choices, averaged over the questions): a model whose interval
# reaches it is indistinguishable from guessing. **What to look for:** overlapping intervals between SFT and PPO.
# When RL *lowers* such scores (the original: TruthfulQA 0.329 -> 0.222) the literature calls it the
# **alignment tax**: the price in capability paid for the preferred style.

# %%
benchmarks = {"truthful_qa mc1": data.load_truthful_qa_mc1(cfg.truthful_qa, n=cfg.max_questions, shuffle_seed=cfg.seed),
              "mmlu world_religions": data.load_mmlu(cfg.mmlu, subject="world_religions", n=cfg.max_questions)}
bench = {}
for bname, questions in benchmarks.items():
    for name in MODELS:
        with use(name):
            res = evaluation.score_choices_loglik(model, tokenizer, questions, batch_size=cfg.batch_size,
                                                  label=f"{bname} / {name}")
            bench[f"{bname} | {name} | loglik"] = res
            if name != "base":
                bench[f"{bname} | {name} | letter"] = evaluation.score_letter_answer(
                    model, tokenizer, questions, batch_size=cfg.batch_size, label=f"{bname} / {name}")
chance = {bname: sum(1 / len(q.choices) for q in questions) / len(questions) for bname, questions in benchmarks.items()}
summary = {k: {f: v[f] for f in ("accuracy", "ci_low", "ci_high", "n")} | {"chance": chance[k.split(" | ")[0]]}
           for k, v in bench.items()}
(out / "benchmarks.json").write_text(json.dumps(summary, indent=1))
display(pd.DataFrame(summary).T.round(3))
display(plots.accuracy_bars({k: v for k, v in summary.items() if "loglik" in k}, path=out / "benchmarks.png",
                            title="Log-likelihood protocol (95% Wilson CI, dashed: chance)"))
display(plots.accuracy_bars({k: v for k, v in summary.items() if "letter" in k}, path=out / "benchmarks_letter.png",
                            title="Letter protocol, the original's (95% Wilson CI, dashed: chance)"))

# %% [markdown]
# ## 7. What RL changed, and what it did not
# Generated from the numbers above. Was PPO worth it? Notebook 06 trains DPO and GRPO from the same SFT adapter,
# on the same data and reward model, and adds them to this comparison on these same prompts (the three-way
# table is in its stage folder and in the run's `report.md`).

# %%
ppo_vs_sft = tests["PPO vs SFT"]
lines = ["**Reward.** " + evaluation.describe_change("reward", ppo_vs_sft)]
std_sft, std_ppo = ppo_vs_sft["before"]["std"], ppo_vs_sft["after"]["std"]
lines.append(f"**Spread.** The reward's standard deviation went from {std_sft:.2f} (SFT) to {std_ppo:.2f} (PPO).")
len_sft = sum(lengths["sft"]) / len(lengths["sft"])
len_ppo = sum(lengths["ppo"]) / len(lengths["ppo"])
lines.append(f"**Length.** Mean answer length went from {len_sft:.1f} to {len_ppo:.1f} words; the reward model's "
             f"length preference (Spearman rho on PPO answers) is {bias['ppo']['spearman_rho']:.2f}.")
for bname in benchmarks:
    s, p = summary[f"{bname} | sft | loglik"], summary[f"{bname} | ppo | loglik"]
    overlap = not (p["ci_high"] < s["ci_low"] or s["ci_high"] < p["ci_low"])
    lines.append(f"**{bname}.** SFT {s['accuracy']:.3f} [{s['ci_low']:.2f}, {s['ci_high']:.2f}] vs PPO "
                 f"{p['accuracy']:.3f} [{p['ci_low']:.2f}, {p['ci_high']:.2f}]: "
                 + ("the intervals overlap: no evidence that RL changed what the model knows."
                    if overlap else "the intervals do not overlap: RL changed accuracy here; read the answers.")
                 + (f" Both are indistinguishable from chance ({chance[bname]:.2f}): this model cannot answer these yet."
                    if max(s["ci_low"], p["ci_low"]) <= chance[bname] else "")
                 + (" A drop like this is the alignment tax." if not overlap and p["accuracy"] < s["accuracy"] else ""))
from IPython.display import Markdown  # noqa: E402

display(Markdown("\n\n".join(lines)))

# %%
figures = plots.redraw_run(run)  # every figure again, from the run folder's logs alone
metrics = {"preset": course.name, "n_prompts": len(test_prompts), "samples_per_prompt": held_out.samples,
           **{f"reward_mean_{n}": float(rewards[n].mean()) for n in MODELS},
           **{f"reward_median_{n}": float(pd.Series(rewards[n]).median()) for n in MODELS},
           **{f"reward_std_{n}": float(rewards[n].std(ddof=1)) for n in MODELS},
           "ppo_vs_sft_wilcoxon_p": ppo_vs_sft["wilcoxon"]["p"],
           "ppo_vs_sft_mann_whitney_p": ppo_vs_sft["mann_whitney"]["p"],
           "ppo_vs_sft_mean_diff": ppo_vs_sft["bootstrap"]["diff"],
           "ppo_vs_sft_ci": [ppo_vs_sft["bootstrap"]["ci_low"], ppo_vs_sft["bootstrap"]["ci_high"]],
           "mean_length_sft": len_sft, "mean_length_ppo": len_ppo,
           **{f"acc {k}": v["accuracy"] for k, v in summary.items()},
           "summary": " ".join(lines)}
finish_stage(run, "05_evaluation", metrics)
metrics

# %% [markdown]
# ## Your turn
# **1. Ask SAWYER your own question**: section 2b's `my_question`, or a list of your own below, all three models.

# %%
my_questions = ["Give me three tips for a job interview.", "Why is the sky blue?"]  # <- your questions
with pd.option_context("display.max_colwidth", 200):
    display(three_models([chat.format_prompt([("human", q)]) for q in my_questions]))

# %% [markdown]
# **2. Does the verdict survive a smaller test set?** Re-run the PPO-vs-SFT comparison on the first `n` prompts
# only. How small can `n` get before "a shift" turns into "no detectable change"?

# %%
n = max(4, len(test_prompts) // 3)  # <- try other sizes
small = evaluation.compare(rewards["sft"][:n], rewards["ppo"][:n], paired=True, n_resamples=2000, seed=cfg.seed)
print(f"first {n} prompts: " + evaluation.describe_change("reward", small))

# %% [markdown]
# **3. Read the answers the reward model loves.** The five PPO answers with the highest reward, with their length:
# are they the best answers, or the longest?

# %%
ppo_rewards, ppo_answers = held_out.all_rewards["ppo"], held_out.all_answers["ppo"]
top = sorted(range(len(ppo_answers)), key=lambda j: -ppo_rewards[j])[:5]
display(pd.DataFrame({"question": [every_question[j][:60] for j in top],
                      "PPO answer": [ppo_answers[j][:150] for j in top],
                      "reward": [round(float(ppo_rewards[j]), 2) for j in top],
                      "words": [held_out.all_lengths["ppo"][j] for j in top]}))
