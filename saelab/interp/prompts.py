"""The auto-interpretation prompts: loaded from `prompts.yaml` beside this file and rendered as chats.

A chat is a list of {"role", "content"} messages (the OpenAI / HF chat-template format): the entry's
`system`, its few-shot `shots` as user/assistant turns, then its `user` template filled by `str.format`.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import yaml

PROMPTS_FILE = Path(__file__).with_name("prompts.yaml")
KINDS = ("explainer", "detection", "fuzzing", "detection_logprob", "fuzzing_logprob")

Chat = list[dict[str, str]]


@functools.cache
def load_prompts(path: str | None = None) -> dict[str, Any]:
    """The prompt entries of `path` (default `prompts.yaml`), checked to hold every kind."""
    file = Path(path) if path else PROMPTS_FILE
    data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    missing = [k for k in KINDS if not isinstance(data.get(k), dict) or "user" not in data[k]]
    if missing:
        raise ValueError(f"{file} has no prompt entry with a `user` template for {', '.join(missing)}.")
    return data


def render(kind: str, path: str | None = None, **fields: Any) -> Chat:
    """The chat of prompt entry `kind` with `fields` filled into its system and user templates."""
    entry = load_prompts(path)[kind]
    chat: Chat = []
    if entry.get("system"):
        chat.append({"role": "system", "content": entry["system"].format(**fields)})
    for shot in entry.get("shots") or []:
        chat.append({"role": "user", "content": shot["user"]})
        chat.append({"role": "assistant", "content": shot["assistant"]})
    chat.append({"role": "user", "content": entry["user"].format(**fields)})
    return chat
