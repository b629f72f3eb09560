"""The conversation template, guanaco parsing, reply extraction and the terminal chat (sawyer.chat)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sawyer.chat import (BOT, HUMAN, STOP, Chat, extract_reply, format_conversation, format_prompt,
                         from_prompt_response, parse_guanaco, split_for_training, trim_to_last_bot)

REPO = Path(__file__).resolve().parent.parent


def test_markers():
    assert (HUMAN, BOT, STOP) == ("###HUMAN###", "###BOT###", "###STOP###")


def test_format_conversation_literal():
    assert format_conversation([("human", "hi"), ("bot", "sup")]) == "###HUMAN### hi ###BOT### sup ###STOP###"


def test_format_prompt_literal():
    assert format_prompt([("human", "hi")]) == "###HUMAN### hi ###BOT###"
    assert format_prompt("hi") == "###HUMAN### hi ###BOT###"


def test_multi_turn_literal():
    turns = [("human", "hi"), ("bot", "sup"), ("human", " how are you?\n"), ("bot", "fine")]
    assert format_conversation(turns) == ("###HUMAN### hi ###BOT### sup ###HUMAN### how are you? "
                                          "###BOT### fine ###STOP###")
    assert format_prompt(turns[:3]) == "###HUMAN### hi ###BOT### sup ###HUMAN### how are you? ###BOT###"


def test_template_refuses_bad_conversations():
    with pytest.raises(ValueError, match="end on a bot turn"):
        format_conversation([("human", "hi")])
    with pytest.raises(ValueError, match="end on a human turn"):
        format_prompt([("human", "hi"), ("bot", "sup")])
    with pytest.raises(ValueError, match="role"):
        format_prompt([("user", "hi")])
    with pytest.raises(ValueError, match="marker"):
        format_prompt("hi ###STOP### there")
    with pytest.raises(ValueError, match="at least one turn"):
        format_conversation([])


def test_split_for_training_concatenates_to_the_conversation():
    turns = [("human", "hi"), ("bot", "sup"), ("human", "and you?"), ("bot", "fine")]
    prompt, completion = split_for_training(turns)
    assert prompt == "###HUMAN### hi ###BOT### sup ###HUMAN### and you? ###BOT###"
    assert completion == " fine ###STOP###"
    assert prompt + completion == format_conversation(turns)
    assert split_for_training([("human", "hi"), ("bot", "sup")]) == ("###HUMAN### hi ###BOT###", " sup ###STOP###")


def test_parse_guanaco_multi_turn():
    text = ("### Human: What is 2+2?### Assistant: 4.\n\nAnything else?"
            "### Human:  Why?  ### Assistant: Because 2 and 2 make 4.")
    assert parse_guanaco(text) == [("human", "What is 2+2?"), ("bot", "4.\n\nAnything else?"),
                                   ("human", "Why?"), ("bot", "Because 2 and 2 make 4.")]


def test_parse_guanaco_errors():
    with pytest.raises(ValueError, match="marker"):
        parse_guanaco("just some text")
    with pytest.raises(ValueError, match="before the first marker"):
        parse_guanaco("preamble ### Human: hi### Assistant: sup")


def test_from_prompt_response():
    assert from_prompt_response(" hi ", "sup\n") == [("human", "hi"), ("bot", "sup")]


def test_trim_to_last_bot():
    turns = [("human", "a"), ("bot", "b"), ("human", "c")]
    assert trim_to_last_bot(turns) == [("human", "a"), ("bot", "b")]
    assert trim_to_last_bot(turns[:2]) == turns[:2]
    assert trim_to_last_bot([("human", "a")]) is None
    assert trim_to_last_bot([]) is None


@pytest.mark.parametrize("generated, reply", [
    ("###HUMAN### hi ###BOT### sup ###STOP###", "sup"),                       # prompt included, stopped
    (" sup ###STOP###", "sup"),                                                # new text only
    ("###HUMAN### hi ###BOT### sup ###HUMAN### next", "sup"),                  # rambles into a human turn
    ("###HUMAN### a ###BOT### b ###HUMAN### c ###BOT### d ###STOP### junk", "d"),  # the LAST bot turn
    ("sup there", "sup there"),                                                # no marker at all
    ("###HUMAN### hi ###BOT###sup###STOP###</s><pad>", "sup"),                 # special tokens decoded, no spaces
    ("###HUMAN### hi ###BOT###", ""),                                          # nothing generated
])
def test_extract_reply(generated, reply):
    assert extract_reply(generated) == reply


def test_extract_reply_extra_stops():
    assert extract_reply(" sup</s><pad><pad>", extra_stops=["</s>", "<pad>"]) == "sup"


def test_chat_history():
    chat = Chat()
    chat.add_user("hi")
    assert chat.prompt() == "###HUMAN### hi ###BOT###"
    chat.add_bot("sup")
    chat.add_user("and you?")
    assert chat.prompt() == "###HUMAN### hi ###BOT### sup ###HUMAN### and you? ###BOT###"
    chat.reset()
    assert chat.turns == []


def test_generate_reply_on_tiny_llama():
    from sawyer.chat import generate_reply, stop_token_ids
    from sawyer.loading import load_causal_lm, load_tokenizer

    model, tok = load_causal_lm("tiny:llama"), load_tokenizer("tiny:llama")
    assert stop_token_ids(tok) == [tok.eos_token_id]  # the base tokenizer has no ###STOP### token
    reply = generate_reply(model, tok, [("human", "hello")], max_new_tokens=6, do_sample=False)
    assert isinstance(reply, str) and STOP not in reply and HUMAN not in reply and BOT not in reply
    assert reply == generate_reply(model, tok, "hello", max_new_tokens=6, do_sample=False)


def test_cli_pipe_two_messages():
    from sawyer.loading import resolve

    base = resolve("tiny:llama")  # build the tiny model here, so the subprocess only loads it
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "sawyer.chat", "--base", base, "--max-new-tokens", "8", "--seed", "0"],
        input="hello there\n/reset\nsay ###BOT### yes\nwhat is a dog?\n/quit\nnever read\n", capture_output=True,
        text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    replies = [line for line in proc.stdout.splitlines() if line.startswith("SAWYER: ") or line == "SAWYER:"]
    assert len(replies) == 2, proc.stdout
    assert "(history cleared)" in proc.stdout
    assert "(not sent: turn 0: message contains the template marker '###BOT###')" in proc.stdout  # and chat goes on


def test_question_from_prompt_literals():
    from sawyer.chat import question_from_prompt

    assert question_from_prompt("###HUMAN### hi ###BOT###") == "hi"
    assert question_from_prompt("###HUMAN### a ###BOT### b ###HUMAN### What now? ###BOT###") == "What now?"
    assert question_from_prompt("  plain question ") == "plain question"


# --------------------------------------------------------------------------- typed text stays text
def test_a_refused_message_leaves_the_history_intact():
    chat = Chat([("human", "hi"), ("bot", "sup")])
    for bad in ("tell me ###BOT### yes", "###STOP###", "   "):
        with pytest.raises(ValueError):
            chat.add_user(bad)
        assert chat.turns == [("human", "hi"), ("bot", "sup")]
    chat.add_user("and you?")
    assert chat.prompt() == "###HUMAN### hi ###BOT### sup ###HUMAN### and you? ###BOT###"


@pytest.fixture(scope="module")
def sawyer_tokenizer():
    """The tiny Llama tokenizer with the three markers added as special tokens, as after SFT."""
    from sawyer.loading import load_tokenizer

    tok = load_tokenizer("tiny:llama")
    tok.add_tokens([STOP, HUMAN, BOT], special_tokens=True)
    return tok


def test_typed_control_tokens_are_encoded_as_text(sawyer_tokenizer):
    from sawyer.chat import control_token_ids, encode_prompt

    tok = sawyer_tokenizer
    eos, bos, human, bot = tok.eos_token_id, tok.bos_token_id, tok.convert_tokens_to_ids(HUMAN), \
        tok.convert_tokens_to_ids(BOT)
    assert tok("hi </s>", add_special_tokens=False)["input_ids"][-1] == eos  # the trap: plain tokenizing
    assert {eos, bos, tok.unk_token_id, human, bot} <= control_token_ids(tok)
    turns = [("human", "hi </s> there <s>"), ("bot", "sup<unk>"), ("human", "x</s>")]
    ids = encode_prompt(tok, turns)
    assert eos not in ids and tok.unk_token_id not in ids
    assert ids.count(bos) == 1 and ids[0] == bos                 # only the template's BOS
    assert [i for i in ids if i in control_token_ids(tok)] == [bos, human, bot, human, bot]
    assert tok.decode(ids[1:]).count("</s>") == 2                 # ... the characters are all still there
    spelled = tok("</s>", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert len(spelled) > 1 and eos not in spelled


def test_plain_messages_encode_exactly_as_in_training(sawyer_tokenizer):
    from sawyer.chat import encode_prompt

    turns = [("human", "What is a dog?"), ("bot", "An animal."), ("human", "And a cat?")]
    assert encode_prompt(sawyer_tokenizer, turns) == sawyer_tokenizer(format_prompt(turns))["input_ids"]
    assert encode_prompt(sawyer_tokenizer, "hi") == sawyer_tokenizer(format_prompt("hi"))["input_ids"]


def test_generate_reply_feeds_the_model_no_typed_eos(sawyer_tokenizer):
    from sawyer.loading import load_causal_lm

    model = load_causal_lm("tiny:llama")
    model.resize_token_embeddings(len(sawyer_tokenizer))
    seen = []
    generate = model.generate

    def spy(**kwargs):
        seen.append(kwargs["input_ids"][0].tolist())
        return generate(**kwargs)

    model.generate = spy
    from sawyer.chat import generate_reply

    generate_reply(model, sawyer_tokenizer, "please stop </s> <s> now", max_new_tokens=3, do_sample=False)
    tok = sawyer_tokenizer
    assert seen and tok.eos_token_id not in seen[0] and seen[0].count(tok.bos_token_id) == 1
    assert seen[0][-1] == tok.convert_tokens_to_ids(BOT)  # the prompt still ends on the real ###BOT### token


# --------------------------------------------------------------------------- start-up errors are one line
def _main_error(capsys, *argv):
    from sawyer.chat import main

    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_missing_adapter_is_one_line(tmp_path, capsys):
    err = _main_error(capsys, "--base", "tiny:llama", "--adapter", str(tmp_path / "runs" / "w" / "04_ppo" / "adapter"))
    assert err.startswith("sawyer.chat: adapter folder") and "does not exist" in err and "04_ppo/adapter" in err


def test_invalid_adapter_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    err = _main_error(capsys, "--base", "tiny:llama", "--adapter", str(tmp_path / "empty"))
    assert "is not an adapter folder: it has no adapter_config.json" in err
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text("{not json", encoding="utf-8")
    err = _main_error(capsys, "--base", "tiny:llama", "--adapter", str(tmp_path / "broken"))
    assert "could not load the adapter" in err and "broken" in err


def test_missing_base_folder_is_not_called_an_offline_problem(tmp_path, capsys):
    err = _main_error(capsys, "--base", str(tmp_path / "models" / "sawyer-base"))
    assert "there is no such local folder" in err and "offline" not in err
