"""The SAWYER conversation template, reply extraction, and a terminal chat.

A raw base LLM has never seen a chat; SFT teaches it one fixed text layout (DESIGN.md, Part 2)::

    ###HUMAN### hi ###BOT### sup ###HUMAN### how are you? ###BOT### fine ###STOP###

Each turn renders as ``###HUMAN### {msg} `` or ``###BOT### {msg} `` (note the trailing space). A *prompt*
asks the model to speak next, so it ends with ``###BOT###`` right after the last turn's space; a *finished*
conversation ends with ``###STOP###``, the token the model learns to emit when it is done (generation stops
on its id). The three markers become new tokens in ``sawyer.tokens``; here they are plain strings, so the
template also works, less reliably, with a tokenizer that has never seen them.

Messages are stripped of surrounding whitespace when rendered (training data and typed input then agree),
and a message that contains a marker is refused: it would silently re-shape the conversation.

Typed text is *text*. A user who types ``</s>`` or ``<|eot_id|>`` must not end the prompt with a real EOS
id, nor ``<s>`` start a new sequence: ``encode_prompt`` tokenizes the template as usual and spells any control
token that appears inside a message out as ordinary characters (``<``, ``/``, ``s``, ``>``).

Command line (reads stdin line by line, so a pipe can drive it)::

    python -m sawyer.chat --base meta-llama/Meta-Llama-3-8B --adapter runs/x/sft --load-in-4bit
    echo -e "hi\\nand you?" | python -m sawyer.chat --base tiny:llama

``/reset`` clears the history, ``/quit`` (or end of input) leaves.
"""
from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

HUMAN = "###HUMAN###"
BOT = "###BOT###"
STOP = "###STOP###"
MARKERS = (HUMAN, BOT, STOP)

#: One turn of a conversation: ``("human", "hi")`` or ``("bot", "sup")``.
Turn = tuple[str, str]

_ROLE_MARKER = {"human": HUMAN, "bot": BOT}
_GUANACO = re.compile(r"###\s*(Human|Assistant)\s*:")


# --------------------------------------------------------------------------- rendering
def _check(turns: Sequence[Turn]) -> list[Turn]:
    turns = list(turns)
    if not turns:
        raise ValueError("a conversation needs at least one turn")
    for i, turn in enumerate(turns):
        if not (isinstance(turn, (tuple, list)) and len(turn) == 2):
            raise ValueError(f"turn {i} must be a (role, message) pair, got {turn!r}")
        role, msg = turn
        if role not in _ROLE_MARKER:
            raise ValueError(f"turn {i}: role must be 'human' or 'bot', got {role!r}")
        if not isinstance(msg, str):
            raise ValueError(f"turn {i}: message must be a string, got {type(msg).__name__}")
        for marker in MARKERS:
            if marker in msg:
                raise ValueError(f"turn {i}: message contains the template marker {marker!r}")
    return turns


def _render(turns: Sequence[Turn]) -> str:
    return _render_spans(turns)[0]


def _render_spans(turns: Sequence[Turn]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered turns and the ``(start, end)`` character span of each message in that text."""
    text, spans = "", []
    for role, msg in turns:
        text += f"{_ROLE_MARKER[role]} "
        spans.append((len(text), len(text) + len(msg.strip())))
        text += f"{msg.strip()} "
    return text, spans


def format_conversation(turns: Sequence[Turn]) -> str:
    """A finished conversation (training text): every turn, then ``###STOP###``. Must end on a bot turn."""
    turns = _check(turns)
    if turns[-1][0] != "bot":
        raise ValueError("a finished conversation must end on a bot turn (trim it with trim_to_last_bot)")
    return _render(turns) + STOP


def format_prompt(turns_or_str: str | Sequence[Turn]) -> str:
    """A generation prompt ending in ``###BOT###``. A string means one human message; turns must end on a human."""
    turns = _check([("human", turns_or_str)] if isinstance(turns_or_str, str) else turns_or_str)
    if turns[-1][0] != "human":
        raise ValueError("a prompt must end on a human turn (the bot speaks next)")
    return _render(turns) + BOT


def question_from_prompt(prompt: str) -> str:
    """The last human message of a generation prompt: what a reward model trained on plain questions
    should see. ``"###HUMAN### hi ###BOT###"`` -> ``"hi"``; a prompt without markers is returned stripped."""
    text = prompt.rsplit(BOT, 1)[0] if prompt.rstrip().endswith(BOT) else prompt
    return text.rsplit(HUMAN, 1)[-1].strip()


def split_for_training(turns: Sequence[Turn]) -> tuple[str, str]:
    """``(prompt_text, completion_text)`` with ``prompt + completion == format_conversation(turns)``.

    The completion is the final bot message plus ``###STOP###`` (`` sup ###STOP###``); SFT puts the loss on
    those tokens only (completion-only masking), so the model learns to answer and to stop, not to imitate
    the human. Earlier bot turns stay in the prompt as context.
    """
    text = format_conversation(turns)
    turns = _check(turns)
    prompt = _render(turns[:-1]) + BOT
    completion = f" {turns[-1][1].strip()} {STOP}"
    assert prompt + completion == text
    return prompt, completion


# --------------------------------------------------------------------------- parsing datasets
def parse_guanaco(text: str) -> list[Turn]:
    """Turns of a guanaco row: ``### Human: hi### Assistant: sup`` -> ``[("human", "hi"), ("bot", "sup")]``.

    Messages are stripped. Text without any marker, or with text before the first marker, is a ValueError
    (that text would otherwise be lost without notice).
    """
    if not isinstance(text, str):
        raise ValueError(f"guanaco text must be a string, got {type(text).__name__}")
    parts = _GUANACO.split(text)  # [before, role, msg, role, msg, ...]
    if len(parts) == 1:
        raise ValueError("no '### Human:' / '### Assistant:' marker in the text")
    if parts[0].strip():
        raise ValueError(f"text before the first marker: {parts[0].strip()[:60]!r}")
    return [("human" if role == "Human" else "bot", msg.strip()) for role, msg in zip(parts[1::2], parts[2::2])]


def from_prompt_response(prompt: str, response: str) -> list[Turn]:
    """A single exchange: ``[("human", prompt), ("bot", response)]`` (stripped)."""
    return [("human", prompt.strip()), ("bot", response.strip())]


def trim_to_last_bot(turns: Sequence[Turn]) -> list[Turn] | None:
    """Drop trailing human turns (nothing to learn from them); ``None`` when no bot turn remains.

    A conversation ending on a human turn would otherwise be trained with every label masked.
    """
    turns = list(turns)
    while turns and turns[-1][0] != "bot":
        turns.pop()
    return turns or None


def extract_reply(generated: str, extra_stops: Iterable[str] = ()) -> str:
    """The bot's reply in generated text: after the LAST ``###BOT###``, cut at ``###STOP###`` or ``###HUMAN###``.

    Works on the full text (prompt included) or on the new text only, and with or without special tokens
    decoded; ``extra_stops`` (e.g. the tokenizer's EOS string) are cut at too. Text with no ``###BOT###`` is
    taken as the reply itself. The original app split on the wrong marker; this cuts on the right ones.
    """
    start = generated.rfind(BOT)
    text = generated if start < 0 else generated[start + len(BOT):]
    for stop in (STOP, HUMAN, *extra_stops):
        if stop:
            text = text.split(stop, 1)[0]
    return text.strip()


# --------------------------------------------------------------------------- multi-turn history
class Chat:
    """A multi-turn history: ``add_user`` / ``add_bot``, then ``prompt()`` for the next generation.

    A message is checked *before* it joins the history: a refused one (``ValueError``: it contains a template
    marker, or is empty) leaves the conversation exactly as it was, so the next message works.
    """

    def __init__(self, turns: Iterable[Turn] = ()):
        turns = list(turns)
        self.turns: list[Turn] = _check(turns) if turns else []

    def _add(self, role: str, message: str) -> None:
        _check([(role, message)])
        if role == "human" and not message.strip():
            raise ValueError("an empty message")
        self.turns.append((role, message))

    def add_user(self, message: str) -> None:
        self._add("human", message)

    def add_bot(self, message: str) -> None:
        self._add("bot", message)

    def prompt(self) -> str:
        return format_prompt(self.turns)

    def reset(self) -> None:
        self.turns.clear()


# --------------------------------------------------------------------------- generation
def stop_token_ids(tokenizer) -> list[int]:
    """Ids that end a reply: EOS, plus each marker that is a token of this vocabulary: ``###STOP###`` and
    every marker that begins a new turn (``###HUMAN###``, ``###BOT###``). A reply that invents the user's next
    turn ends there, instead of reaching a reward model or the screen as one merged text."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    vocab = tokenizer.get_vocab()
    for marker in (STOP, HUMAN, BOT):
        if marker in vocab and vocab[marker] not in ids:
            ids.append(vocab[marker])
    return ids


def control_token_ids(tokenizer) -> set[int]:
    """Ids a user must never produce by typing: the special tokens (BOS, EOS, PAD, UNK, ...) and every
    added token marked special (the SAWYER markers, Llama-3's ``<|eot_id|>`` and reserved tokens)."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if tok.special)
    return ids


def encode_prompt(tokenizer, history: str | Sequence[Turn]) -> list[int]:
    """Token ids of ``format_prompt(history)`` in which the messages are encoded as plain text.

    A tokenizer matches special-token strings anywhere in its input, so ``tokenizer("hi </s>")`` would give
    the EOS id. We tokenize the whole prompt normally (so ids match what SFT trained on, BOS included) and
    re-encode every control token whose characters lie inside a message with ``split_special_tokens=True``:
    typed ``</s>`` becomes the tokens of the characters ``</s>``. Needs a fast tokenizer (offsets).
    """
    turns = _check([("human", history)] if isinstance(history, str) else history)
    text = format_prompt(turns)
    spans = _render_spans(turns)[1]
    enc = tokenizer(text, return_offsets_mapping=True)
    control = control_token_ids(tokenizer)
    ids = []
    for tok, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
        if tok in control and end > start and any(a <= start and end <= b for a, b in spans):
            spelled = tokenizer(text[start:end], add_special_tokens=False, split_special_tokens=True)["input_ids"]
            if control & set(spelled):
                raise ValueError(f"cannot encode {text[start:end]!r} as plain text with this tokenizer")
            ids.extend(spelled)
        else:
            ids.append(tok)
    return ids


def generate_reply(model, tokenizer, history: str | Sequence[Turn] | Chat, *, max_new_tokens: int = 128,
                   temperature: float = 0.7, do_sample: bool = True) -> str:
    """Generate the bot's next reply to ``history`` (a message, turns ending on a human turn, or a ``Chat``).

    Generation stops at EOS or ``###STOP###`` (passed as ``eos_token_id``, so the stop id is applied on
    every call, not only the first). The prompt is tokenized by ``encode_prompt``: typed control-token text
    stays text. When the prompt would not fit the model's context, the oldest turns are dropped.
    ``temperature <= 0`` or ``do_sample=False`` means greedy decoding.
    """
    import torch

    turns = history.turns if isinstance(history, Chat) else history
    turns = [("human", turns)] if isinstance(turns, str) else list(turns)
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(tokenizer, "model_max_length", 10**9)
    while True:
        ids = encode_prompt(tokenizer, turns)
        if len(ids) + max_new_tokens <= limit or len(turns) <= 1:
            break
        turns = turns[2:] if len(turns) > 2 else turns[1:]  # drop the oldest exchange
    stops = stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else None)
    sample = do_sample and temperature > 0
    kwargs = {"do_sample": sample, "max_new_tokens": max_new_tokens, "eos_token_id": stops, "pad_token_id": pad}
    if sample:
        kwargs["temperature"] = temperature
    input_ids = torch.tensor([ids], device=model.device)  # (1, P)
    enc = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    model.eval()
    with torch.no_grad():
        out = model.generate(**enc, **kwargs)
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    for i, tok in enumerate(new):  # everything after the first stop id is padding
        if tok in stops:
            new = new[:i]
            break
    text = tokenizer.decode(new, skip_special_tokens=False)
    return extract_reply(text, extra_stops=[s for s in (tokenizer.eos_token, tokenizer.pad_token) if s])


# --------------------------------------------------------------------------- command line
class ChatSetupError(ValueError):
    """The chat cannot start: a missing or invalid adapter or base model. The message is one line."""


def check_adapter(adapter: str | Path) -> Path:
    """The adapter folder, or a ``ChatSetupError`` saying what is wrong with it and where adapters are.

    An adapter folder (written by ``sawyer.tokens.save_adapter``) holds ``adapter_config.json``; notebook 02
    writes ``runs/<name>/02_sft/adapter`` and notebook 04 ``runs/<name>/04_ppo/adapter``.
    """
    path = Path(adapter).expanduser()
    where = "notebook 02 writes runs/<name>/02_sft/adapter, notebook 04 runs/<name>/04_ppo/adapter"
    if not path.exists():
        raise ChatSetupError(f"adapter folder {str(adapter)!r} does not exist ({where})")
    if not path.is_dir() or not (path / "adapter_config.json").is_file():
        raise ChatSetupError(f"{str(adapter)!r} is not an adapter folder: it has no adapter_config.json ({where})")
    return path


def load_chat_model(base: str, adapter: str | None = None, load_in_4bit: bool = False):
    """``(model, tokenizer)``: the base model, plus an SFT/PPO adapter (with its marker tokens) when given.

    Raises ``ChatSetupError`` (one line) when the adapter or the base model cannot be loaded.
    """
    from sawyer.loading import ModelLoadError

    try:
        return _load_chat_model(base, adapter, load_in_4bit)
    except ModelLoadError as e:
        raise ChatSetupError(" ".join(str(e).split())) from e
    except ChatSetupError:
        raise
    except (OSError, ValueError, RuntimeError) as e:  # e.g. a broken adapter_config.json, or another base's adapter
        what = f"adapter {str(adapter)!r} on base {base!r}" if adapter else f"base model {base!r}"
        raise ChatSetupError(f"could not load the {what}: {type(e).__name__}: {' '.join(str(e).split())}") from e


def _load_chat_model(base: str, adapter: str | None, load_in_4bit: bool):
    if adapter:
        adapter = check_adapter(adapter)
        from sawyer.tokens import load_adapter

        return load_adapter(base, adapter, load_in_4bit=load_in_4bit)
    from sawyer.loading import load_causal_lm, load_tokenizer

    return load_causal_lm(base, load_in_4bit=load_in_4bit), load_tokenizer(base)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sawyer.chat", description="Chat with a SAWYER model.")
    parser.add_argument("--base", required=True, help="base model: hub id, folder or tiny:<name>")
    parser.add_argument("--adapter", help="SFT/PPO adapter folder (omit to chat with the base model)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.7, help="0 means greedy")
    parser.add_argument("--load-in-4bit", action="store_true", help="4-bit NF4 base weights (8B on a T4)")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)

    import torch

    if args.seed is not None:
        torch.manual_seed(args.seed)
    try:
        model, tokenizer = load_chat_model(args.base, args.adapter, args.load_in_4bit)
    except ChatSetupError as e:
        print(f"sawyer.chat: {e}", file=sys.stderr)
        return 2
    interactive = sys.stdin.isatty()
    print("SAWYER chat: type a message; /reset clears the history, /quit leaves.", file=sys.stderr)
    chat = Chat()
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:  # end of input
            break
        message = line.strip()
        if not message:
            continue
        if message == "/quit":
            break
        if message == "/reset":
            chat.reset()
            print("(history cleared)", flush=True)
            continue
        try:
            chat.add_user(message)  # a refused message never joins the history
        except ValueError as e:
            print(f"(not sent: {e})", flush=True)
            continue
        reply = generate_reply(model, tokenizer, chat, max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature)
        chat.add_bot(reply)
        print(f"SAWYER: {reply}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
