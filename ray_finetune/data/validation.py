"""Shape checks for each task type (SPEC §3), run over every line before a run is queued."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ray_finetune.data import sources
from ray_finetune.errors import ValidationError

CHAT_ROLES = ("system", "user", "assistant", "tool")
MAX_REPORTED_LINES = 5
MESSAGE_KEYS = {"role", "content", "weight", "tool_calls", "tool_call_id", "name"}


def chat_problem(record: Any) -> str | None:
    """What is wrong with one chat record, or None. Beside role and content, OpenAI's chat format: a per-turn
    `weight` on assistant messages, assistant `tool_calls`, `tool` messages answering them, and the record's
    `tools` (its `parallel_tool_calls` flag is accepted and has no effect on training). A table's struct columns
    give every message every field, so an absent field may come as null."""
    if not isinstance(record, dict) or "messages" not in record:
        return "has no 'messages' list"
    unknown = set(record) - {"messages", "tools", "parallel_tool_calls"}
    if unknown:
        return f"has unknown keys {sorted(unknown)}"
    messages = record["messages"]
    if not isinstance(messages, list) or len(messages) < 2:
        return "'messages' must be a list of at least two messages"
    tools_problem = _tools_problem(record.get("tools"))
    if tools_problem:
        return tools_problem
    previous = None
    for index, message in enumerate(messages):
        problem = _message_problem(index, message)
        if problem:
            return problem
        role = message["role"]
        if role == "system" and index != 0:
            return f"message {index} is a system message; only the first message may be"
        if role == "tool" and previous not in ("assistant", "tool"):
            return f"message {index} is a tool result with no assistant tool call before it"
        if previous is not None and role == previous and role != "tool":   # a tool message per parallel call
            return f"messages {index - 1} and {index} are both {role!r}; roles must alternate"
        previous = role
    if messages[-1]["role"] != "assistant":
        return "the last message must be from the assistant"
    if all(message.get("weight") == 0 for message in messages if message["role"] == "assistant"):
        return "every assistant message has weight 0, so the record has nothing to learn"
    return None


def uses_tools(record: dict[str, Any]) -> bool:
    return bool(record.get("tools")) or any(message.get("tool_calls") for message in record["messages"])


def _message_problem(index: int, message: Any) -> str | None:
    if not isinstance(message, dict) or set(message) - MESSAGE_KEYS or "role" not in message:
        return (f"message {index} must be an object with 'role' and 'content' (and optionally 'name'; assistant "
                f"messages may add 'weight' and 'tool_calls', tool messages 'tool_call_id')")
    role = message["role"]
    if role not in CHAT_ROLES:
        return f"message {index} has role {role!r} (one of {', '.join(CHAT_ROLES)})"
    content = message.get("content")
    if content is None and not message.get("tool_calls"):
        return f"message {index} has no content (only an assistant message that calls tools may have none)"
    if content is not None and not isinstance(content, str):
        return _content_parts_problem(index, content)
    for key, allowed in (("tool_calls", "assistant"), ("tool_call_id", "tool")):
        if message.get(key) is not None and role != allowed:
            return f"message {index} is a {role!r} message with {key!r}; only {allowed} messages have one"
    return _weight_problem(index, message) or _tool_calls_problem(index, message.get("tool_calls"))


def _content_parts_problem(index: int, content: Any) -> str | None:
    """Content that is not a string must be OpenAI's list of content parts, text parts only (a text model)."""
    if not isinstance(content, list) or not content:
        return f"message {index} has content that is neither a string nor a list of text parts"
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            shown = f"of type {kind!r}" if kind else repr(part)[:60]
            return (f"message {index} has a content part {shown}; only text parts "
                    f'({{"type": "text", "text": "..."}}) can train a text model')
    return None


def content_text(content: Any) -> Any:
    """A message's content as one string: OpenAI's text parts follow each other as chat templates that take part
    lists write them (one after another, nothing between)."""
    return "".join(part["text"] for part in content) if isinstance(content, list) else content


def _tool_calls_problem(index: int, calls: Any) -> str | None:
    """OpenAI's tool calls: [{"id", "type": "function", "function": {"name", "arguments"}}], the arguments a
    JSON object (or a string holding one, as OpenAI writes them)."""
    if calls is None:
        return None
    if not isinstance(calls, list) or not calls:
        return f"message {index} has 'tool_calls' that is not a non-empty list"
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            return f"message {index} has a tool call without function.name"
        if tool_arguments(function.get("arguments")) is None:
            return (f"message {index} calls {function['name']!r} with arguments that are not a JSON object "
                    f"(an object, or a string holding one)")
    return None


def tool_arguments(arguments: Any) -> dict[str, Any] | None:
    """A tool call's arguments as an object (chat templates write them out with `tojson`), or None."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    return arguments if isinstance(arguments, dict) else None


def _tools_problem(tools: Any) -> str | None:
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(
            isinstance(tool, dict) and isinstance(tool.get("function"), dict)
            and isinstance(tool["function"].get("name"), str) for tool in tools):
        return "'tools' must be a list of {\"type\": \"function\", \"function\": {\"name\", ...}}"
    return None


def _weight_problem(index: int, message: dict[str, Any]) -> str | None:
    """OpenAI's per-turn weight: 0 leaves an assistant turn out of the loss, 1 (or none) keeps it. A table's
    struct column gives every message the field, so an absent weight may come as null."""
    weight = message.get("weight")
    if weight is None:
        return None
    if message["role"] != "assistant":
        return f"message {index} is a {message['role']!r} message with a weight; only assistant messages have one"
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight not in (0, 1):
        return f"message {index} has weight {weight!r}; expected 0 (not trained on) or 1"
    return None


def instruction_problem(record: Any) -> str | None:
    if not isinstance(record, dict):
        return "is not a JSON object"
    response_key = "response" if record.get("response") is not None else "completion"
    if "prompt" not in record or response_key not in record:
        return "needs 'prompt' and 'response' (or 'completion')"
    unknown = set(record) - {"prompt", "response", "completion"}
    if unknown:
        return f"has unknown keys {sorted(unknown)}"
    if not isinstance(record["prompt"], str) or not isinstance(record[response_key], str):
        return "'prompt' and 'response' must be strings"
    if not record[response_key]:
        return "'response' is empty"
    return None


SHAPES = {
    "CHAT_COMPLETION": sources.RecordShape(
        chat_problem, 'one CHAT_COMPLETION record per line, in UTF-8 JSON: {"messages": [{"role": "user", '
                      '"content": "..."}, {"role": "assistant", "content": "..."}]}'),
    "INSTRUCTION_FINETUNE": sources.RecordShape(
        instruction_problem, 'one INSTRUCTION_FINETUNE record per line, in UTF-8 JSON: {"prompt": "...", '
                             '"response": "..."}'),
}
COLUMNS = {"CHAT_COMPLETION": frozenset({"messages", "tools", "parallel_tool_calls"}),
           "INSTRUCTION_FINETUNE": frozenset({"prompt", "response", "completion"})}


def check_data(parameter: str, path: str, task_type: str, data_prep_cluster_id: str | None = None,
               tokenizer: Any = None) -> int:
    """Check every record (or document); returns how many there are. Reports the first few bad ones and the count.
    Given the model's tokenizer, also that its chat template writes out the tool calls and tools the data has."""
    source = sources.locate(parameter, path, data_prep_cluster_id)
    if task_type == "CONTINUED_PRETRAIN":
        files = sources.text_files(source)
        for file in files:
            sources.read_text(source, file)
        return len(files)
    if source.kind == "folder":
        raise ValidationError(parameter, f"{path!r} is a folder", file=source.where,
                              expected=f"a .jsonl file, a Hugging Face dataset or a Delta table for {task_type} (a "
                                       f"folder of .txt files trains with task_type='CONTINUED_PRETRAIN')")
    problem_of, expected = SHAPES[task_type]
    bad: list[tuple[str, str]] = []
    bad_count = records = 0
    first_tool_use: str | None = None
    # Malformed records that are well-formed records of another task type: task_type left at its default
    # (CHAT_COMPLETION) with prompt/response data is the commonest mistake of all.
    other_task_types: set[str | None] = set()
    # Whole rows: _as_record_of cuts a dataset's or table's row to each task type's columns as it checks it.
    for location, record in sources.read_records(source, None, unreadable_lines=True):
        records += 1
        if isinstance(record, sources.UnreadableLine):
            problem = record.problem
            other_task_types.add(None)
        else:
            problem = problem_of(_as_record_of(task_type, record, source))
            if problem:
                other_task_types.add(_task_type_it_fits(record, source))
        if problem:
            bad_count += 1
            if len(bad) < MAX_REPORTED_LINES:
                bad.append((location, problem))
        elif first_tool_use is None and task_type == "CHAT_COMPLETION" and uses_tools(record):
            first_tool_use = location
    if bad:
        listing = "; ".join(f"{where}: {problem}" for where, problem in bad)
        other_task_type = next(iter(other_task_types)) if len(other_task_types) == 1 else None
        if other_task_type:
            expected += (f" (every malformed record is well-formed {other_task_type} data: pass "
                         f"task_type='{other_task_type}')")
        raise ValidationError(parameter, f"{bad_count} of {records} records are malformed ({listing})",
                              file=source.where, line=_line_number(bad[0][0]),
                              expected=expected)
    if records == 0:
        raise ValidationError(parameter, "has no records", file=source.where, expected="at least one record")
    if first_tool_use and tokenizer is not None:
        from ray_finetune.data.formats import TOOL_TEMPLATE_EXPECTED, tool_template_problem

        problem = tool_template_problem(tokenizer)
        if problem:
            where = "" if _line_number(first_tool_use) else f" ({first_tool_use})"   # a line is named anyway
            raise ValidationError("model", f"{problem}, which this data uses{where}",
                                  file=source.where, line=_line_number(first_tool_use),
                                  expected=TOOL_TEMPLATE_EXPECTED)
    return records


def _as_record_of(task_type: str, record: Any, source: sources.DataSource) -> Any:
    """A record as the task type reads it: a JSONL line whole (an unknown key there is a mistake to report), a
    dataset's or table's row by the task's own columns only (rows often carry ids and metadata)."""
    if source.kind == "file" or not isinstance(record, dict):
        return record
    return {key: value for key, value in record.items() if key in COLUMNS[task_type]}


def _task_type_it_fits(record: Any, source: sources.DataSource) -> str | None:
    return next((task_type for task_type, shape in SHAPES.items()
                 if shape.problem_of(_as_record_of(task_type, record, source)) is None), None)


def _line_number(location: str) -> int | None:
    """The line of a JSONL location ("line 12"); datasets and tables have rows, not lines."""
    return int(location.split()[-1]) if location.startswith("line") else None


ARCHITECTURE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def check_checkpoint(parameter: str, path: str, model_path: str | Path) -> None:
    """A complete checkpoint (folder, pointer file or .pt) of the same architecture as the base model."""
    from ray_finetune import storage
    from ray_finetune.train.checkpoint import initial_weights

    try:
        weights = initial_weights(parameter, path)
    except ValidationError:
        raise
    except Exception as error:  # noqa: BLE001 - an object store that does not answer, or refuses the credentials
        raise ValidationError(parameter, f"{str(path)!r} could not be read from here ({type(error).__name__}: "
                              f"{' '.join(str(error).split())})",
                              expected="a checkpoint in storage this machine reaches with its credentials") from None
    base = json.loads((Path(model_path) / "config.json").read_text())
    if weights.suffix != ".pt":   # a weights folder (on object storage, only its config is read here)
        theirs = json.loads(storage.read_text(weights / "config.json"))
        different = [k for k in ARCHITECTURE_KEYS if theirs.get(k) != base.get(k)]
        if different:
            found = ", ".join(f"{k}={theirs.get(k)}" for k in different)
            wanted = ", ".join(f"{k}={base.get(k)}" for k in different)
            raise ValidationError(parameter, f"{str(path)!r} is a different architecture ({found})",
                                  expected=f"a checkpoint of the same model as `model` ({wanted})")
        return
    _check_state_dict(parameter, storage.pull(weights), Path(model_path))


def _check_state_dict(parameter: str, file: Path, model_path: Path) -> None:
    from safetensors import safe_open

    from ray_finetune.train.models import read_state_dict

    try:
        state = read_state_dict(file)   # as the trainers will read it
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same answer
        raise ValidationError(parameter, f"{str(file)!r} is not a readable state dict ({error})",
                              expected="a .pt file written by torch.save(model.state_dict())") from None
    if not isinstance(state, dict):
        raise ValidationError(parameter, f"{str(file)!r} does not hold a state dict", expected="a dict of tensors")
    expected: dict[str, tuple[int, ...]] = {}
    for shard in model_path.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as handle:
            for key in handle.keys():
                expected[key] = tuple(handle.get_slice(key).get_shape())
    mismatched = [k for k, shape in expected.items() if k in state and tuple(state[k].shape) != shape]
    missing = [k for k in expected if k not in state and not k.endswith("lm_head.weight")]
    if mismatched or missing:
        sample = (mismatched or missing)[:3]
        raise ValidationError(parameter, f"{str(file)!r} does not match the base model "
                              f"({len(mismatched)} tensors of another shape, {len(missing)} missing, e.g. {sample})",
                              expected="weights of the same architecture as `model`")
