"""Formatting: records → token ids and a target mask per token, for each task type (SPEC §3).

target_mask[t] is True when token t is something the model must learn to predict (from the tokens before it
in the same document). Labels are built from it at packing time, never from the pad id: for many chat models
the pad token *is* the EOS token, and EOS must be learned.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from ray_finetune.data.validation import content_text, tool_arguments, uses_tools
from ray_finetune.errors import ValidationError, one_line


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


def require_chat_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ValidationError("model", "the tokenizer has no chat template (a base model?)",
                              expected="a chat model for CHAT_COMPLETION, or task_type INSTRUCTION_FINETUNE "
                                       "(prompt/response pairs, no template)")


def check_tokenizer(tokenizer: Any, task_type: str) -> None:
    """What a task type needs of the model's tokenizer: an EOS to end examples, and for chats a template in which
    assistant turns can be located (else the data packer would fail the run on its first conversation)."""
    eos_token_id(tokenizer)
    if task_type == "CHAT_COMPLETION":
        require_chat_template(tokenizer)
        try:
            format_chats(tokenizer, [{"messages": _PROBES[1][1:]}])   # three exchanges, no system message
        except ValidationError:
            raise
        except Exception:  # noqa: BLE001 - a template that refuses this probe itself (one that insists on a
            pass           # system message, say) leaves the verdict to the data's own conversations


def format_chat(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
                ) -> TokenizedExample:
    """The model's own chat template; targets are the assistant turns (but those with weight 0), including their
    end-of-turn token, and including the tool calls they make; tool results are context."""
    return format_chats(tokenizer, [{"messages": messages, "tools": tools}])[0]


def format_chats(tokenizer: Any, records: list[dict[str, Any]]) -> list[TokenizedExample]:
    """format_chat for a batch of chat records, tokenized in one call (a third faster than one by one).

    Character spans of the assistant turns become token spans through the tokenizer's offsets. The spans come
    from two renders of the conversation when the template lays turns out regularly (checked once per template
    and again per conversation), else from rendering every prefix of it (exact for any prefix-stable template,
    but quadratic in the number of turns). Conversations with tools always take the prefix way: a tool call is
    written around or instead of the content, so the content alone does not show where the turn lies.
    """
    require_chat_template(tokenizer)
    shape = _turn_shape(tokenizer)
    rendered = []
    for record in records:
        messages = [_for_template(message) for message in record["messages"]]
        tools = record.get("tools") or None
        with_tools = uses_tools(record)
        if with_tools and (problem := tool_template_problem(tokenizer)):   # unchecked data (validate_inputs=False)
            raise ValidationError("model", problem, expected=TOOL_TEMPLATE_EXPECTED)
        located = _spans_by_shape(tokenizer, messages, shape) if shape and not with_tools else None
        full, spans = located or _spans_by_prefixes(tokenizer, messages, tools)
        rendered.append((full, _trained(spans, record["messages"])))
    encodings = tokenizer([full for full, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
    return [_with_targets(ids, offsets, spans) for ids, offsets, (_, spans)
            in zip(encodings["input_ids"], encodings["offset_mapping"], rendered)]


def _for_template(message: dict[str, Any]) -> dict[str, Any]:
    """A message as chat templates expect it (transformers' convention): no nulls (a table gives every message
    every field), content as one string (OpenAI's list of text parts joined; many templates take strings only),
    content "" on a tool-calling turn without any (many templates read it unconditionally),
    tool-call arguments as an object (OpenAI writes them as a JSON string; templates write them out with
    `tojson`)."""
    shown = {key: value for key, value in message.items() if value is not None and key != "weight"}
    shown["content"] = content_text(shown.get("content", ""))
    if "tool_calls" in shown:
        shown["tool_calls"] = [
            {**{k: v for k, v in call.items() if v is not None}, "type": call.get("type") or "function",
             "function": {"name": call["function"]["name"],
                          "arguments": tool_arguments(call["function"].get("arguments"))}}
            for call in shown["tool_calls"]]
    return shown


def _trained(spans: Spans, messages: list[dict[str, Any]]) -> Spans:
    """The spans of the assistant turns to learn: all but those with weight 0 (OpenAI's per-turn weight), which
    stay in the row as context."""
    weights = [message.get("weight") for message in messages if message["role"] == "assistant"]
    return [span for span, weight in zip(spans, weights, strict=True) if weight != 0]


def _with_targets(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> TokenizedExample:
    """A token is a target when it begins inside a span; spans are sorted and disjoint, so only the last span
    starting at or before the token can hold it."""
    begins = np.asarray([begin for begin, _ in offsets], dtype=np.int64)
    starts = np.asarray([start for start, _ in spans], dtype=np.int64)
    ends = np.asarray([end for _, end in spans], dtype=np.int64)
    span = np.searchsorted(starts, begins, side="right") - 1
    mask = (span >= 0) & (begins < ends[span.clip(min=0)]) if spans else np.zeros(len(begins), dtype=bool)
    return TokenizedExample(list(ids), mask.tolist())


Spans = list[tuple[int, int]]


def _render(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool = False,
            tools: list[dict[str, Any]] | None = None) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def _spans_by_prefixes(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
                       ) -> tuple[str, Spans]:
    """Each assistant turn is the text between "the conversation so far, with the generation prompt" and "the
    conversation including this turn"."""
    full = _render(tokenizer, messages, tools=tools)
    spans: Spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:index], generation_prompt=True, tools=tools)
        through = _render(tokenizer, messages[: index + 1], tools=tools)
        if not full.startswith(before) or not full.startswith(through):
            raise ValidationError("model", "the chat template does not render conversations incrementally, so "
                                  "assistant turns cannot be located", expected="a prefix-stable chat template")
        spans.append((len(before), len(through)))
    return full, spans


# Stand-ins for message contents (Unicode private-use characters, which real text does not contain), so that one
# render shows where each content lands.
_MARK = re.compile("\ue000(\\d+)\ue001")


def _marked(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{**message, "content": f"\ue000{k}\ue001"} for k, message in enumerate(messages)]


@dataclass(frozen=True)
class _TurnShape:
    """How a regular template lays out an assistant turn: `opener` (the generation prompt) right before its
    content, `closer` (end of turn) right after it."""
    opener: str
    closer: str


_SHAPES: dict[str, _TurnShape | None] = {}
_PROBES = [
    [{"role": "user", "content": "Hi there."}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": " and 3+3? "},
     {"role": "assistant", "content": "6\n"}, {"role": "user", "content": "Thanks"},
     {"role": "assistant", "content": "You are welcome."}],
]


def _turn_shape(tokenizer: Any) -> _TurnShape | None:
    """The template's turn shape, when the two-render method reproduces the prefix method exactly on probe
    conversations; None (use the prefix method) otherwise. Computed once per template."""
    template = _template_key(tokenizer)
    if template not in _SHAPES:
        _SHAPES[template] = _probe_turn_shape(tokenizer)
    return _SHAPES[template]


def _template_key(tokenizer: Any) -> str:
    """What the probes' verdicts are cached by: the template, or all of a tokenizer's named templates (a dict:
    transformers renders with its "tool_use" one when tools are given, else its "default")."""
    template = tokenizer.chat_template
    return json.dumps(template, sort_keys=True) if isinstance(template, dict) else template


def _assistant_closer(tokenizer: Any) -> str:
    """What the template writes right after an assistant message's content: its end of turn."""
    full = _render(tokenizer, _PROBES[0])
    content = _PROBES[0][1]["content"]
    return full[full.index(content) + len(content):]


def _probe_turn_shape(tokenizer: Any) -> _TurnShape | None:
    try:
        probe = _PROBES[0]
        opener = _render(tokenizer, probe[:1], generation_prompt=True)[len(_render(tokenizer, probe[:1])):]
        shape = _TurnShape(opener, _assistant_closer(tokenizer))
        if all(_spans_by_shape(tokenizer, p, shape) == _spans_by_prefixes(tokenizer, p) for p in _PROBES):
            return shape
    except (ValidationError, ValueError):
        pass
    return None


def _spans_by_shape(tokenizer: Any, messages: list[dict[str, str]], shape: _TurnShape
                    ) -> tuple[str, Spans] | None:
    """Two renders: one with stand-ins that shows where each content lands, one real one that must equal it
    with the contents put back (else the template changes contents, e.g. trims them). None when any check fails."""
    if any("\ue000" in m["content"] or "\ue001" in m["content"] for m in messages):
        return None
    pieces = _MARK.split(_render(tokenizer, _marked(messages)))
    if [int(k) for k in pieces[1::2]] != list(range(len(messages))):
        return None
    text, starts = [pieces[0]], []
    length = len(pieces[0])
    for k, literal in zip(pieces[1::2], pieces[2::2]):
        starts.append(length)
        content = messages[int(k)]["content"]
        text += [content, literal]
        length += len(content) + len(literal)
    full = "".join(text)
    if full != _render(tokenizer, messages):
        return None
    spans: Spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, end = starts[k], starts[k] + len(message["content"]) + len(shape.closer)
        if full[start - len(shape.opener):start] != shape.opener or full[end - len(shape.closer):end] != shape.closer:
            return None
        spans.append((start, end))
    return full, spans


def turn_end_token_id(tokenizer: Any) -> int | None:
    """The special token the chat template ends an assistant turn with (`<|im_end|>`, `<end_of_turn>`,
    `<|eot_id|>`): chat training teaches the model to emit it (it is a target), so generation must stop there.
    Often not the tokenizer's EOS: a base model's EOS ends documents (Qwen2.5's `<|endoftext|>`, Llama 3.2's
    `<|end_of_text|>`). None without a chat template, or when turns end in plain text."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        closer = _assistant_closer(tokenizer)
    except ValueError:   # the template changes contents; no turn end to find
        return None
    ids = tokenizer(closer, add_special_tokens=False)["input_ids"] if closer else []
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    return int(ids[0]) if ids and ids[0] in special else None


# A conversation with a tool list, a tool call and its result, each carrying text that shows whether the template
# wrote it out.
_TOOLS_PROBE = [{"type": "function", "function": {
    "name": "lookup", "description": "Looks up a fact (tools list shown).",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}]
_TOOL_CALL_PROBE = [
    {"role": "user", "content": "Look it up."},
    {"role": "assistant", "tool_calls": [{"id": "call0", "type": "function",
                                          "function": {"name": "lookup", "arguments": {"query": "call shown"}}}]},
    {"role": "tool", "tool_call_id": "call0", "name": "lookup", "content": "result shown"},
    {"role": "assistant", "content": "Found it."},
]


TOOL_TEMPLATE_EXPECTED = ("a model whose chat template renders tools and tool_calls (e.g. Qwen2.5, Llama 3.1 "
                          "Instruct), or data without them")
_TOOL_PROBLEMS: dict[str, str | None] = {}


def tool_template_problem(tokenizer: Any) -> str | None:
    """Why the model's chat template cannot train on tool use (it leaves out the tools list, the calls or their
    results: training would teach turns with the calls missing), or None. Probed once per template."""
    template = _template_key(tokenizer)
    if template not in _TOOL_PROBLEMS:
        _TOOL_PROBLEMS[template] = _probe_tool_template(tokenizer)
    return _TOOL_PROBLEMS[template]


def _probe_tool_template(tokenizer: Any) -> str | None:
    messages = [_for_template(message) for message in _TOOL_CALL_PROBE]
    try:
        text = _render(tokenizer, messages, tools=_TOOLS_PROBE)
        left_out = [what for what, mark in (("the tools list", "tools list shown"), ("tool calls", "call shown"),
                                            ("tool results", "result shown")) if mark not in text]
        if left_out:
            return f"the model's chat template leaves out {' and '.join(left_out)}"
        _spans_by_prefixes(tokenizer, messages, _TOOLS_PROBE)   # the turns of a tool conversation can be located
    except ValidationError as error:
        return f"with tools, {error.problem}"
    except Exception as error:  # noqa: BLE001 - a template's own error (raise_exception, a missing key)
        return f"the model's chat template fails on tool calls ({one_line(error)})"
    return None


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
        return format_chats(tokenizer, [record])[0]
    if task_type == "INSTRUCTION_FINETUNE":
        return format_instruction(tokenizer, record["prompt"], record.get("response", record.get("completion")))
    raise ValueError(f"records are not used for {task_type}")


CHAT_BATCH = 64


def examples_from_records(tokenizer: Any, task_type: str, records: Iterator[tuple[int, Any]]
                          ) -> Iterator[TokenizedExample]:
    if task_type != "CHAT_COMPLETION":
        for _, record in records:
            yield format_record(tokenizer, task_type, record)
        return
    batch: list[dict[str, Any]] = []
    for _, record in records:
        batch.append(record)
        if len(batch) == CHAT_BATCH:
            yield from format_chats(tokenizer, batch)
            batch = []
    if batch:
        yield from format_chats(tokenizer, batch)
