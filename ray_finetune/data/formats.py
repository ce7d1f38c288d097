"""Formatting: records → token ids and a target mask per token, for each task type (SPEC §3).

target_mask[t] is True when token t is something the model must learn to predict (from the tokens before it
in the same document). Labels are built from it at packing time, never from the pad id: for many chat models
the pad token *is* the EOS token, and EOS must be learned.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from ray_finetune.errors import ValidationError


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    target_mask: list[bool]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def target_count(self) -> int:
        return sum(self.target_mask[1:])


def eos_token_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise ValidationError("model", "the tokenizer has no EOS token", expected="a tokenizer with an eos_token")
    return int(tokenizer.eos_token_id)


def format_chat(tokenizer: Any, messages: list[dict[str, str]]) -> TokenizedExample:
    """The model's own chat template; targets are the assistant turns, including their end-of-turn token.

    Each assistant turn is located as the text between "the conversation so far, with the generation prompt"
    and "the conversation including this turn"; character spans become token spans through the offsets.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValidationError("model", "the tokenizer has no chat template",
                              expected="a chat model for CHAT_COMPLETION (or use INSTRUCTION_FINETUNE)")
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans: list[tuple[int, int]] = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if not full.startswith(before) or not full.startswith(through):
            raise ValidationError("model", "the chat template does not render conversations incrementally, so "
                                  "assistant turns cannot be located", expected="a prefix-stable chat template")
        spans.append((len(before), len(through)))
    encoding = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    mask = [any(start <= begin < end for start, end in spans) for begin, _ in encoding["offset_mapping"]]
    return TokenizedExample(ids, mask)


def format_instruction(tokenizer: Any, prompt: str, response: str) -> TokenizedExample:
    """Prompt then response then EOS, no template; targets are the response and the EOS."""
    prompt_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    response_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"]) + [eos_token_id(tokenizer)]
    return TokenizedExample(prompt_ids + response_ids, [False] * len(prompt_ids) + [True] * len(response_ids))


def format_document(tokenizer: Any, text: str) -> TokenizedExample:
    """Raw text then EOS; every token is a target."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [eos_token_id(tokenizer)]
    return TokenizedExample(ids, [True] * len(ids))


def format_record(tokenizer: Any, task_type: str, record: dict[str, Any]) -> TokenizedExample:
    if task_type == "CHAT_COMPLETION":
        return format_chat(tokenizer, record["messages"])
    if task_type == "INSTRUCTION_FINETUNE":
        return format_instruction(tokenizer, record["prompt"], record.get("response", record.get("completion")))
    raise ValueError(f"records are not used for {task_type}")


def examples_from_records(tokenizer: Any, task_type: str, records: Iterator[tuple[int, Any]]
                          ) -> Iterator[TokenizedExample]:
    for _, record in records:
        yield format_record(tokenizer, task_type, record)
