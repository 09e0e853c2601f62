"""One raw row -> one validated example (chat messages, quality score, metadata) -> one
record in mlx-lm's format, which both engines read. A row that cannot be mapped raises
Rejected with the field and the reason; the caller adds the file and line.

A preference pair (for a dpo or orpo stage) is an example whose last message is the chosen
answer, with the rejected answer beside it: its record is a chat record plus "rejected", so
the same file also trains SFT on the chosen answers."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Optional

from trainer.config import DatasetSection
from trainer.data.readers import shown

ROLES = {"system", "user", "assistant"}


@dataclass
class Example:
    messages: list[dict[str, str]]
    source: str
    quality: Optional[float] = None
    metadata: Optional[dict[str, Any]] = None
    rejected: Optional[str] = None  # the rejected answer of a preference pair

    def key(self) -> str:
        return hashlib.sha256(json.dumps([self.messages, self.rejected], sort_keys=True).encode()).hexdigest()

    def prompt_text(self) -> str:
        return "\n".join(m["content"] for m in self.messages if m["role"] != "assistant")

    def completion_text(self) -> str:
        return "\n".join(m["content"] for m in self.messages if m["role"] == "assistant")


@dataclass
class Rejected(Exception):
    """Raised while mapping a row; becomes a RowError with the row's location."""

    field: Optional[str]
    reason: str


def _text(row: dict[str, Any], name: str, required: bool) -> Optional[str]:
    value = row.get(name)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        if required:
            raise Rejected(name, "missing field" if name not in row else "value is empty")
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise Rejected(name, f"must be text, got {type(value).__name__}")
    text = str(value)
    if not text.strip():
        if required:
            raise Rejected(name, "value is empty")
        return None
    return text


def _quality(row: dict[str, Any], name: str) -> Optional[float]:
    value = row.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise Rejected(name, f"non-numeric quality score {shown(value)}")
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise Rejected(name, f"non-numeric quality score {shown(value)}") from None
    if not math.isfinite(score):
        raise Rejected(name, f"quality score must be a finite number, got {shown(value)}")
    if not 0 <= score <= 1:
        raise Rejected(name, f"quality score must be in [0, 1], got {score:g}")
    return score


def _metadata(row: dict[str, Any], name: str) -> Optional[dict[str, Any]]:
    value = row.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise Rejected(name, "metadata text is not valid JSON") from None
    if not isinstance(value, dict):
        raise Rejected(name, f"metadata must be an object, got {type(value).__name__}")
    return value


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise Rejected("messages", "must be a non-empty list of {role, content} objects")
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, dict):
            raise Rejected("messages", f"message {index} is not an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise Rejected("messages", f"message {index} has role {shown(role)}; allowed: assistant, system, user")
        if not isinstance(content, str) or not content.strip():
            raise Rejected("messages", f"message {index} ({role}) has empty or non-text content")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "assistant":
        raise Rejected("messages", "the last message must be the assistant's answer")
    if not any(m["role"] == "user" for m in messages):
        raise Rejected("messages", "there is no user message")
    return messages


def _prompt(row: dict[str, Any], dataset: DatasetSection) -> list[dict[str, str]]:
    """The system and user messages from the configured fields."""
    instruction = _text(row, dataset.instruction_field, True)
    extra = _text(row, dataset.input_field, False) if dataset.input_field else None
    system = _text(row, dataset.system_field, False) if dataset.system_field else None
    user = f"{instruction}\n\n{extra}" if extra else instruction
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def _pair(row: dict[str, Any], dataset: DatasetSection) -> tuple[list[dict[str, str]], str]:
    """A preference row: the prompt (prompt_field, else the instruction fields), chosen, rejected."""
    if dataset.prompt_field in row or dataset.instruction_field not in row:
        system = _text(row, dataset.system_field, False) if dataset.system_field else None
        prompt = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": _text(row, dataset.prompt_field, True)}]
    else:
        prompt = _prompt(row, dataset)
    chosen = _text(row, dataset.chosen_field, True)
    rejected = _text(row, dataset.rejected_field, True)
    if chosen == rejected:
        raise Rejected(dataset.rejected_field, "the rejected answer is the chosen one; a pair needs two answers")
    return prompt + [{"role": "assistant", "content": chosen}], rejected


def to_example(row: Any, dataset: DatasetSection, source: str, preference: bool = False) -> Example:
    """Map one raw row to an Example (a preference pair with `preference`), or raise Rejected
    naming the bad field."""
    if not isinstance(row, dict):
        raise Rejected(None, f"row must be an object, got {type(row).__name__}")
    rejected = None
    if preference:
        messages, rejected = _pair(row, dataset)
    elif dataset.instruction_field not in row and "messages" in row:
        messages = _messages(row["messages"])
    elif "prompt" in row and "completion" in row and dataset.output_field not in row:
        messages = [{"role": "user", "content": _text(row, "prompt", True)},
                    {"role": "assistant", "content": _text(row, "completion", True)}]
    else:
        messages = _prompt(row, dataset) + [{"role": "assistant", "content": _text(row, dataset.output_field, True)}]
    quality = _quality(row, dataset.quality_field) if dataset.quality_field else None
    metadata = _metadata(row, dataset.metadata_field) if dataset.metadata_field else None
    return Example(messages=messages, source=source, quality=quality, metadata=metadata, rejected=rejected)


def to_record(example: Example, record_format: str) -> dict[str, Any]:
    """The processed JSONL record: mlx-lm's chat or completions format plus our extras."""
    if record_format == "chat":
        record: dict[str, Any] = {"messages": example.messages}
    else:
        turns = [m for m in example.messages if m["role"] != "system"]
        if len(turns) != 2:
            raise Rejected("messages", "a multi-turn conversation cannot be a completion record; "
                                       "use record_format: chat")
        record = {"prompt": turns[0]["content"], "completion": turns[1]["content"]}
        system = [m["content"] for m in example.messages if m["role"] == "system"]
        if system:
            record["system"] = system[0]
    if example.rejected is not None:
        record["rejected"] = example.rejected
    if example.quality is not None:
        record["quality"] = example.quality
    if example.metadata is not None:
        record["metadata"] = example.metadata
    record["source"] = example.source
    return record
