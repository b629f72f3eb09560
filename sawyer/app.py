"""The "vibe check": a Streamlit chat with a SAWYER model (base model + SFT or PPO adapter).

    streamlit run sawyer/app.py -- --base tiny:llama --adapter runs/workshop/04_ppo/adapter
    # or with environment variables: SAWYER_BASE=... SAWYER_ADAPTER=... streamlit run sawyer/app.py

The model loads once per process (``st.cache_resource``), not once per message. The history lives in
``st.session_state`` and is formatted by ``sawyer.chat``; generation stops at ``###STOP###`` on every call
(the original app lost the stop id on cache hits) and the reply is cut after the last ``###BOT###``
(the original split on the wrong key). ``tests/test_app.py`` drives it headless with Streamlit's AppTest.

Robustness, because a demo in front of a room must not need a restart:
- a refused message (one containing a template marker such as ``###BOT###``) is shown as a warning and
  never joins the history, so the next message works (the original app stored it first, then every later
  message failed until Reset); typed ``</s>``/``<s>`` stay text (``sawyer.chat.encode_prompt``);
- a failed generation takes its message back out of the history;
- a missing or invalid ``--adapter`` or base model is one line on the page, not a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys

import streamlit as st

from sawyer.chat import Chat, ChatSetupError, generate_reply, load_chat_model


def _settings(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="streamlit run sawyer/app.py --")
    parser.add_argument("--base", default=os.environ.get("SAWYER_BASE", "tiny:llama"))
    parser.add_argument("--adapter", default=os.environ.get("SAWYER_ADAPTER") or None)
    parser.add_argument("--load-in-4bit", action="store_true", default=os.environ.get("SAWYER_4BIT") == "1")
    parser.add_argument("--max-new-tokens", type=int, default=int(os.environ.get("SAWYER_MAX_NEW_TOKENS", "128")))
    return parser.parse_known_args(argv)[0]


@st.cache_resource(show_spinner="Loading the model (once per process) ...")
def load_model(base: str, adapter: str | None, load_in_4bit: bool):
    """Base model (+ adapter with its marker tokens) and tokenizer, cached for the whole process."""
    return load_chat_model(base, adapter, load_in_4bit)


def main() -> None:
    args = _settings(sys.argv[1:])
    st.set_page_config(page_title="SAWYER chat", page_icon=":speech_balloon:")
    st.title("SAWYER: Wise Yet Engaging Responses?")
    st.caption(f"base `{args.base}`" + (f" + adapter `{args.adapter}`" if args.adapter else " (no adapter)"))
    try:
        model, tokenizer = load_model(args.base, args.adapter, args.load_in_4bit)
    except ChatSetupError as e:  # not cached: the next run (after fixing the flag) tries again
        st.error(f"Cannot start the chat: {e}")
        st.stop()

    with st.sidebar:
        temperature = st.slider("temperature", 0.0, 1.5, 0.7, 0.05, help="0 = greedy decoding")
        max_new_tokens = st.slider("max new tokens", 8, 512, args.max_new_tokens, 8)
        if st.button("Reset conversation"):
            st.session_state.chat = Chat()

    chat: Chat = st.session_state.setdefault("chat", Chat())
    for role, message in chat.turns:
        st.chat_message("user" if role == "human" else "assistant").write(message)

    if message := st.chat_input("Say something to SAWYER"):
        try:
            chat.add_user(message)  # checked first: a refused message never joins the history
        except ValueError as e:
            st.warning(f"Message not sent: {e}. The conversation is unchanged.")
            return
        st.chat_message("user").write(message)
        try:
            with st.spinner("thinking ..."):
                reply = generate_reply(model, tokenizer, chat, max_new_tokens=max_new_tokens,
                                       temperature=temperature, do_sample=temperature > 0)
        except (RuntimeError, ValueError) as e:
            chat.turns.pop()  # the message goes back out: the history stays a valid conversation
            st.error(f"Generation failed, message not kept: {type(e).__name__}: {e}")
            return
        chat.add_bot(reply or "(empty reply)")
        st.chat_message("assistant").write(reply or "(empty reply)")


main()
