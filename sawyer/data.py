"""Dataset loading and schema checks: one loader per dataset of the course, hub or ``data/`` alike.

Every loader takes a *source*: a hub id (``argilla/news-summary``, read with ``datasets.load_dataset``), a
local folder holding ``{split}.jsonl`` (or ``{config}/{split}.jsonl``), a ``.json``/``.jsonl`` file, or an
http(s) URL. A relative ``data/...`` path is resolved against the repository root, so the ``tiny`` preset's
``data/`` samples (same schema as the hub datasets) go through exactly the same parsing as the real data.

Bad records are never skipped: they raise ``SchemaError`` naming the source, the row and the field, e.g.
``data/news-summary/train.jsonl row 7: field 'text' must be a non-empty string, got None``.
Rows are 1-based line numbers for JSONL files and 0-based indices (``index 12``) for hub datasets and JSON
lists. Files are UTF-8 (a BOM is accepted); a byte that is not names its file, row and byte offset; a source
with no records at all is refused by name. Every filter returns what it kept and reports what it removed.
"""
from __future__ import annotations

import codecs
import itertools
import json
import logging
import math
import os
import random
import re
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sawyer import DATA_DIR
from sawyer.chat import Turn, from_prompt_response, parse_guanaco, trim_to_last_bot

log = logging.getLogger(__name__)
REPO_ROOT = DATA_DIR.parent


class SchemaError(ValueError):
    """A record does not have the shape the course expects; the message names source, row and field."""


class Records(list):
    """A ``list[dict]`` that remembers where each row came from, and checks fields with located errors."""

    def __init__(self, rows: Iterable[dict], source_name: str, line_numbers: Sequence[int] | None = None):
        super().__init__(rows)
        self.source_name = source_name
        self.line_numbers = None if line_numbers is None else list(line_numbers)

    def head(self, n: int | None) -> Records:
        """The first ``n`` rows (all for ``None``), locations kept."""
        return self if n is None else Records(self[:n], self.source_name, self.line_numbers and self.line_numbers[:n])

    def where(self, i: int) -> str:
        """``"<source> row 7"`` (1-based JSONL line) or ``"<source> index 6"`` (hub dataset, JSON list)."""
        return (f"{self.source_name} row {self.line_numbers[i]}" if self.line_numbers is not None
                else f"{self.source_name} index {i}")

    def error(self, i: int, message: str) -> SchemaError:
        return SchemaError(f"{self.where(i)}: {message}")

    def field(self, i: int, name: str, kind: str = "str", *, empty_ok: bool = False):
        """Row ``i``'s field ``name``, checked to be a ``str``, ``strs`` (list of str), ``list``, ``dict``, ``int``
        or ``number``."""
        if name not in self[i]:
            raise self.error(i, f"field {name!r} is missing (the row has fields {sorted(self[i])})")
        return self.check(i, self[i][name], kind, f"field {name!r}", empty_ok=empty_ok)

    def check(self, i: int, value, kind: str, what: str, *, empty_ok: bool = False):
        """``value`` if it is of ``kind``, else a ``SchemaError``: ``"<where>: <what> must be ..., got ..."``."""
        ok = {"str": lambda v: isinstance(v, str) and (empty_ok or v.strip() != ""),
              "list": lambda v: isinstance(v, list) and (empty_ok or len(v) > 0),
              "strs": lambda v: isinstance(v, list) and len(v) > 0 and all(isinstance(x, str) for x in v),
              "dict": lambda v: isinstance(v, dict),
              "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if not ok[kind](value):
            expected = {"int": "an integer", "number": "a finite number", "dict": "an object",
                        "strs": "a non-empty list of strings"}.get(
                kind, f"a {'' if empty_ok else 'non-empty '}{'string' if kind == 'str' else 'list'}")
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise self.error(i, f"{what} must be {expected}, got {shown}")
        return value


# --------------------------------------------------------------------------- reading any source
def _local_path(source: str | os.PathLike) -> Path | None:
    """The local file or folder ``source`` names, or None for a hub id. ``data/...`` is repo-relative."""
    p = Path(source)
    if p.exists():
        return p
    if not p.is_absolute() and (REPO_ROOT / p).exists():
        return REPO_ROOT / p
    if p.is_absolute() or p.parts[:1] == ("data",) or p.suffix in (".json", ".jsonl"):
        raise FileNotFoundError(f"no such local dataset file or folder: {source} (looked in {REPO_ROOT / p})")
    return None


def _display(path: Path) -> str:
    try:
        return path.resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return str(path)


def _download(url: str) -> Path:
    """Fetch ``url`` once into ``$SAWYER_CACHE/downloads`` and return the local file."""
    cache = Path(os.environ.get("SAWYER_CACHE", Path.home() / ".cache" / "sawyer")).expanduser() / "downloads"
    target = cache / re.sub(r"[^A-Za-z0-9._-]+", "_", url.split("://", 1)[1])
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(target.suffix + ".part")
        urllib.request.urlretrieve(url, tmp)  # noqa: S310 (only http(s) URLs reach here)
        tmp.rename(target)
    return target


def _decode(raw: bytes, name: str) -> str:
    """UTF-8 text of a file's bytes, a leading BOM dropped (Notepad and Excel write one).

    A byte that is not UTF-8 is a ``SchemaError`` naming the file, the line and the byte offset, e.g.
    ``data/x.jsonl row 3 (byte 41): not UTF-8 (invalid start byte 0xe9)``: typically a file saved as Latin-1.
    """
    bom = raw.startswith(codecs.BOM_UTF8)
    body = raw[len(codecs.BOM_UTF8):] if bom else raw
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as e:
        start = e.start + (len(codecs.BOM_UTF8) if bom else 0)
        line = raw.count(b"\n", 0, start) + 1
        bad = raw[start:start + max(1, e.end - e.start)].hex(" ")
        raise SchemaError(f"{name} row {line} (byte {start}): not UTF-8 ({e.reason} 0x{bad}); "
                          "re-save the file as UTF-8") from None


def _read_file(path: Path, name: str) -> Records:
    """A ``.jsonl`` file (one object per line; blank lines allowed) or a ``.json`` list of objects.

    JSON Lines are split on ``"\\n"`` only (``"\\r\\n"`` works too): ``str.splitlines`` would also split
    inside a valid row at U+2028, U+0085 or a form feed, characters JSON allows unescaped in strings.
    """
    text = _decode(path.read_bytes(), name)
    if path.suffix == ".jsonl":
        rows, lines = [], []
        for n, line in enumerate(text.split("\n"), start=1):
            if line.strip(" \t\r"):  # JSON's own whitespace; a line of other characters is an error
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise SchemaError(f"{name} row {n}: not valid JSON ({e.msg})") from e
                lines.append(n)
        records = Records(rows, name, lines)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SchemaError(f"{name}: not valid JSON ({e.msg} at line {e.lineno})") from e
        if not isinstance(data, list):
            raise SchemaError(f"{name}: must hold a JSON list of records, got {type(data).__name__}")
        records = Records(data, name)
    for i, row in enumerate(records):
        if not isinstance(row, dict):
            raise records.error(i, f"must be a JSON object, got {type(row).__name__}")
    return records


def _locate(source: str | os.PathLike, split: str, config: str | None) -> Path | None:
    """The local file to read (downloading a URL first), or None for a hub id."""
    if str(source).startswith(("http://", "https://")):
        return _download(str(source))
    path = _local_path(source)
    if path is not None and path.is_dir():
        path = path / (config or "") / f"{split}.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"{_display(path)} not found (a local dataset folder holds "
                                    f"[<config>/]<split>.jsonl, here split={split!r}, config={config!r})")
    return path


def source_name(source: str | os.PathLike, *, split: str = "train", config: str | None = None) -> str:
    """How messages name a source: the URL, the repo-relative file path, or ``hub-id[config/split]``."""
    if str(source).startswith(("http://", "https://")):
        return str(source)
    path = _local_path(source)
    if path is None:
        return f"{source}[{config + '/' if config else ''}{split}]"
    return _display(path / (config or "") / f"{split}.jsonl" if path.is_dir() else path)


def resolve_dataset_commit(repo: str) -> str | None:
    """The commit of hub dataset ``repo``'s main branch, looked up once so an unpinned id is read at a known
    commit; logged as a warning that says how to pin it. ``None`` offline or when the hub cannot be asked
    (``datasets`` then reads its cache or fails with its own message)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return None
    try:
        from huggingface_hub import HfApi

        sha = HfApi().dataset_info(repo).sha
    except Exception as e:  # noqa: BLE001 - any failure to ask the hub only loses the pin, not the data
        log.warning("dataset %r is not pinned and its commit could not be looked up (%s: %s)",
                    repo, type(e).__name__, e)
        return None
    log.warning("dataset %r is not pinned to a commit: reading its main branch at %s; for runs that repeat "
                "exactly, pin it in sawyer/presets.py PINNED as %r", repo, sha, f"{repo}@{sha}")
    return sha


def read_records(source: str | os.PathLike, *, split: str = "train", config: str | None = None) -> Records:
    """Rows of a dataset as a ``Records`` list of dicts (with ``.source_name`` and row locations).

    ``source``: a hub id (``datasets.load_dataset(source, config, split=split)``), a local folder
    (``{folder}/[{config}/]{split}.jsonl``), a ``.json`` (a list of objects) or ``.jsonl`` file, or a URL.
    """
    path = _locate(source, split, config)
    if path is None:
        import datasets

        from sawyer.loading import split_revision

        repo, revision = split_revision(source)  # "org/name@<commit>": the pinned revision (see presets.PINNED)
        if revision is None:
            revision = resolve_dataset_commit(repo)
        try:
            ds = datasets.load_dataset(repo, config, split=split, revision=revision)
        except OSError as e:
            hint = (" You are offline (HF_HUB_OFFLINE=1): use the tiny preset's data/ folders."
                    if os.environ.get("HF_HUB_OFFLINE") == "1" else "")
            raise OSError(f"could not load dataset {source!r} (config={config!r}, split={split!r}).{hint} "
                          f"({type(e).__name__}: {e})") from e
        records = Records(ds.to_list(), source_name(source, split=split, config=config))
    else:
        records = _read_file(path, source_name(source, split=split, config=config))
    if not records:  # later steps would divide by zero or train on nothing
        raise SchemaError(f"{records.source_name}: holds no records (an empty file?); every stage needs data")
    return records


# --------------------------------------------------------------------------- notebook 01: news summaries
def load_news(source: str, split: str = "train", n: int | None = None) -> list[str]:
    """News article texts of ``argilla/news-summary`` (the first ``n``), the queries FLAN-T5 summarises in
    notebook 01. Only ``text`` is used; the dataset's own predictions/annotations are ignored."""
    records = read_records(source, split=split).head(n)
    return [records.field(i, "text") for i in range(len(records))]


def filter_by_chars(texts: Sequence[str], lo: int, hi: int) -> list[str]:
    """Texts with ``lo <= len(text) <= hi`` characters (the original compared on 200-450); logs the count."""
    kept = [t for t in texts if lo <= len(t) <= hi]
    log.info("filter_by_chars: kept %d of %d texts with %d-%d characters", len(kept), len(texts), lo, hi)
    return kept


# --------------------------------------------------------------------------- notebook 02: SFT conversations
def load_conversations(sources: str | Sequence[str], *, max_rows: int | None = None,
                       split: str = "train") -> tuple[list[list[Turn]], dict]:
    """Conversations for SFT from guanaco-style datasets, and per-source counts.

    ``timdettmers/openassistant-guanaco`` rows are multi-turn ``text`` (``### Human: ...### Assistant: ...``);
    ``guanaco/guanaco`` rows also carry ``prompt``/``response``, which are preferred when both are non-empty
    strings. A conversation ending on a human turn is trimmed to its last bot turn (``trimmed``), or dropped
    when it has none (``dropped``). Returns ``(conversations, {source_name: {"rows", "trimmed", "dropped"}})``.
    ``max_rows`` caps the rows read per source.
    """
    sources = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    conversations, stats = [], {}
    for source in sources:
        records = read_records(source, split=split).head(max_rows)
        counts = {"rows": len(records), "trimmed": 0, "dropped": 0}
        for i, row in enumerate(records):
            prompt, response = row.get("prompt"), row.get("response")
            if isinstance(prompt, str) and isinstance(response, str) and prompt.strip() and response.strip():
                turns = from_prompt_response(prompt, response)
            else:
                text = records.field(i, "text")
                try:
                    turns = parse_guanaco(text)
                except ValueError as e:
                    raise records.error(i, f"field 'text' is not a guanaco conversation: {e}") from e
            kept = trim_to_last_bot(turns)
            if kept is None:
                counts["dropped"] += 1
                continue
            counts["trimmed"] += len(kept) < len(turns)
            conversations.append(kept)
        stats[records.source_name] = counts
    return conversations, stats


# --------------------------------------------------------------------------- notebook 03: reward-model pairs
@dataclass
class ComparisonPair:
    """Two answers to one question, ranked by GPT-4's 1-10 scores. ``item`` is the source item's index:
    pairs from one item share a question, so train/eval must be split by ``item`` (``split_by_group``)."""

    question: str
    better: str
    worse: str
    score_diff: float
    better_score: float
    worse_score: float
    item: int = -1


_INSTRUCTION = re.compile(r"### Instruction:[ \t]*\n?")
_INPUT = re.compile(r"\s*### Input:[ \t]*\n?")
_RESPONSE = re.compile(r"\s*### Response:")


def extract_instruction(user_input: str) -> str:
    """The question of an Alpaca-style prompt: the text after ``### Instruction:``, up to ``### Input:`` or
    ``### Response:``.

    Our choice where the original kept the raw block: when there is an ``### Input:`` block, its text is
    appended after a blank line (``instruction + "\\n\\n" + input``) so the question keeps its context
    ("Summarise this text." alone cannot be judged), without the Alpaca headers.
    """
    found = _INSTRUCTION.search(user_input)
    if not found:
        raise ValueError("no '### Instruction:' marker")
    body = user_input[found.end():]
    end = _RESPONSE.search(body)
    if end:
        body = body[:end.start()]
    parts = _INPUT.split(body, maxsplit=1)
    instruction = parts[0].strip()
    context = parts[1].strip() if len(parts) > 1 else ""
    if not instruction:
        raise ValueError("empty instruction after '### Instruction:'")
    return f"{instruction}\n\n{context}" if context else instruction


def load_comparisons(source: str, *, max_items: int | None = None) -> list[ComparisonPair]:
    """Scored comparisons (GPT-4-LLM ``comparison_data_v2.json``) as pairs for the pairwise reward loss.

    Each item is ``{user_input, responses_and_scores: [{response, score, source}]}``; every pair i<j of its
    responses with different scores becomes ``(better, worse, |score difference|)`` (equal scores teach
    nothing and are left out). ``source``: a local ``.json`` file, a ``data/...`` path, or an http(s) URL.
    """
    records = read_records(source).head(max_items)
    pairs = []
    for i in range(len(records)):
        user_input = records.field(i, "user_input")
        try:
            question = extract_instruction(user_input)
        except ValueError as e:
            raise records.error(i, f"field 'user_input': {e}") from e
        answers = []
        for k, entry in enumerate(records.field(i, "responses_and_scores", "list")):
            what = f"field 'responses_and_scores'[{k}]"
            records.check(i, entry, "dict", what)
            response = records.check(i, entry.get("response"), "str", f"{what}['response']", empty_ok=True)
            score = records.check(i, entry.get("score"), "number", f"{what}['score']")
            answers.append((response, float(score)))
        for a, b in itertools.combinations(answers, 2):  # every pair i<j
            if a[1] != b[1]:
                (better, high), (worse, low) = (a, b) if a[1] > b[1] else (b, a)
                pairs.append(ComparisonPair(question, better, worse, high - low, high, low, item=i))
    return pairs


# --------------------------------------------------------------------------- notebook 04: PPO prompts
def load_dolly_prompts(source: str, *, n: int | None = None, seed: int = 42) -> list[str]:
    """PPO prompts from ``databricks-dolly-15k``: ``instruction`` plus ``"\\n\\n" + context`` when it has one.

    Dolly's human-written instructions cover many task kinds, so the policy is rewarded on varied questions
    it never saw in SFT. With ``n`` smaller than the row count, ``n`` rows are sampled with
    ``random.Random(seed)`` (deterministic); otherwise all rows come back in file order.
    """
    records = read_records(source)
    prompts = []
    for i in range(len(records)):
        instruction = records.field(i, "instruction").strip()
        context = records.field(i, "context", empty_ok=True).strip()
        prompts.append(f"{instruction}\n\n{context}" if context else instruction)
    if n is not None and n < len(prompts):
        prompts = random.Random(seed).sample(prompts, n)
    return prompts


# --------------------------------------------------------------------------- notebook 05: knowledge benchmarks
@dataclass
class MCQuestion:
    """A multiple-choice question; ``answer`` is the index of the correct choice."""

    question: str
    choices: list[str]
    answer: int


def load_truthful_qa_mc1(source: str, n: int | None = None, *, shuffle_seed: int | None = None) -> list[MCQuestion]:
    """TruthfulQA ``multiple_choice`` validation (817 questions), ``mc1`` targets: exactly one true choice.

    In the dataset the true choice is always listed **first**, so a model that always answers "A" scores
    100% on the letter protocol. Pass ``shuffle_seed`` to shuffle each question's choices (seeded per
    question, so every model sees the same order); notebook 05 does.

    Questions are built so that imitating common human misconceptions gives the wrong answer; RL on a
    style reward is not expected to improve it (notebook 05: "RL changes style, not knowledge").
    """
    records = read_records(source, split="validation", config="multiple_choice").head(n)
    out = []
    for i in range(len(records)):
        question = records.field(i, "question")
        targets = records.field(i, "mc1_targets", "dict")
        choices = records.check(i, targets.get("choices"), "strs", "field 'mc1_targets.choices'")
        labels = targets.get("labels")
        if not isinstance(labels, list) or len(labels) != len(choices) or any(x not in (0, 1) for x in labels):
            raise records.error(i, f"field 'mc1_targets.labels' must be {len(choices)} labels of 0/1, got {labels!r}")
        if labels.count(1) != 1:
            raise records.error(i, f"field 'mc1_targets.labels' must hold exactly one 1, got {labels!r}")
        order = list(range(len(choices)))
        if shuffle_seed is not None:
            random.Random(f"{shuffle_seed}:{question}").shuffle(order)
        out.append(MCQuestion(question, [choices[j] for j in order], order.index(labels.index(1))))
    return out


def load_mmlu(source: str, subject: str = "world_religions", n: int | None = None) -> list[MCQuestion]:
    """MMLU (``cais/mmlu``) test questions of one subject (world_religions: 171), four choices, int answer."""
    records = read_records(source, split="test", config=subject).head(n)
    out = []
    for i in range(len(records)):
        question = records.field(i, "question")
        choices = records.field(i, "choices", "strs")
        answer = records.field(i, "answer", "int")
        if not 0 <= answer < len(choices):
            raise records.error(i, f"field 'answer' must index one of {len(choices)} choices, got {answer}")
        out.append(MCQuestion(question, choices, answer))
    return out


# --------------------------------------------------------------------------- deterministic splits
def _n_eval(n: int, eval_fraction: float) -> int:
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    return round(n * eval_fraction)


def split(items: Sequence, eval_fraction: float, seed: int) -> tuple[list, list]:
    """``(train, eval)``: a copy shuffled with ``random.Random(seed)``, the last ``round(n * fraction)`` to eval."""
    shuffled = list(items)
    random.Random(seed).shuffle(shuffled)
    k = _n_eval(len(shuffled), eval_fraction)
    return shuffled[:len(shuffled) - k], shuffled[len(shuffled) - k:]


def split_by_group(items: Sequence, key: str | Callable, eval_fraction: float, seed: int) -> tuple[list, list]:
    """Split whole groups (e.g. all pairs of one comparison item, ``key="item"``) so no question is in both
    sides (leakage would inflate eval accuracy). A fraction of the groups, not of the items, goes to eval;
    items keep their original order within each side."""
    get = (lambda x: getattr(x, key)) if isinstance(key, str) else key
    groups = list(dict.fromkeys(get(x) for x in items))
    random.Random(seed).shuffle(groups)
    held = set(groups[len(groups) - _n_eval(len(groups), eval_fraction):])
    return [x for x in items if get(x) not in held], [x for x in items if get(x) in held]
