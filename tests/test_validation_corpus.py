"""A corpus of bad inputs: each is refused by create()'s validation (spec.resolve, which runs before anything is
queued) with a ValidationError naming the parameter, the file and line where there is one, and what was expected."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ray_finetune import spec
from ray_finetune.errors import ValidationError

U = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "hello"}
GOOD_CHAT = json.dumps({"messages": [U, A]})
CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


def chat_file(*lines: str) -> dict:
    return {"file": ("train.jsonl", "\n".join(lines) + "\n")}


def line(value) -> str:
    return json.dumps(value)


# (case id, how to build the input, parameter named, fragment of the message, line named or None)
CORPUS = [
    ("invalid-json", chat_file(GOOD_CHAT, "{oops"), "train_data_path", "not valid JSON", 2),
    ("no-messages", chat_file(line({"conversation": [U, A]})), "train_data_path", "has no 'messages' list", 1),
    ("messages-not-list", chat_file(line({"messages": "hi"})), "train_data_path", "at least two messages", 1),
    ("one-message", chat_file(line({"messages": [U]})), "train_data_path", "at least two messages", 1),
    ("unknown-role", chat_file(line({"messages": [{"role": "bot", "content": "x"}, A]})), "train_data_path",
     "role 'bot'", 1),
    ("content-not-string", chat_file(line({"messages": [{"role": "user", "content": 7}, A]})),
     "train_data_path", "neither a string nor a list of text parts", 1),
    ("content-part-not-text", chat_file(line({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "x.png"}}]}, A]})),
     "train_data_path", "content part of type 'image_url'; only text parts", 1),
    ("content-part-bare-string", chat_file(line({"messages": [{"role": "user", "content": ["x"]}, A]})),
     "train_data_path", "content part 'x'; only text parts", 1),
    ("system-not-first", chat_file(line({"messages": [U, {"role": "system", "content": "s"}, A]})),
     "train_data_path", "only the first message may be", 1),
    ("no-alternation", chat_file(line({"messages": [U, U, A]})), "train_data_path", "roles must alternate", 1),
    ("ends-with-user", chat_file(line({"messages": [U, A, U]})), "train_data_path", "last message must be from the "
                                                                                     "assistant", 1),
    ("message-extra-key", chat_file(line({"messages": [{**U, "metadata": "x"}, A]})), "train_data_path",
     "must be an object with 'role' and 'content'", 1),
    ("weight-on-user", chat_file(line({"messages": [{**U, "weight": 1}, A]})), "train_data_path",
     "'user' message with a weight; only assistant messages have one", 1),
    ("weight-not-0-or-1", chat_file(line({"messages": [U, {**A, "weight": 0.5}]})), "train_data_path",
     "weight 0.5; expected 0 (not trained on) or 1", 1),
    ("weight-text", chat_file(line({"messages": [U, {**A, "weight": "0"}]})), "train_data_path", "weight '0'", 1),
    ("all-weights-zero", chat_file(GOOD_CHAT, line({"messages": [U, {**A, "weight": 0}, U, {**A, "weight": 0}]})),
     "train_data_path", "line 2: every assistant message has weight 0, so the record has nothing to learn", 2),
    ("tool-result-first", chat_file(line({"messages": [U, {"role": "tool", "tool_call_id": "c1", "content": "r"},
                                                     A]})),
     "train_data_path", "message 1 is a tool result with no assistant tool call before it", 1),
    ("tool-calls-on-user", chat_file(line({"messages": [{**U, "tool_calls": [CALL]}, A]})), "train_data_path",
     "'user' message with 'tool_calls'; only assistant messages have one", 1),
    ("tool-arguments-not-json", chat_file(line({"messages": [U, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": "{city: Paris}"}}]}]})),
     "train_data_path", "calls 'get_weather' with arguments that are not a JSON object", 1),
    ("tool-call-without-name", chat_file(line({"messages": [U, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"arguments": "{}"}}]}]})), "train_data_path",
     "a tool call without function.name", 1),
    ("content-missing", chat_file(line({"messages": [U, {"role": "assistant"}]})), "train_data_path",
     "message 1 has no content (only an assistant message that calls tools may have none)", 1),
    ("tools-not-a-list", chat_file(line({"messages": [U, A], "tools": "get_weather"})), "train_data_path",
     "'tools' must be a list", 1),
    ("tools-on-a-template-without-them", chat_file(GOOD_CHAT, line({"messages": [U, {"role": "assistant",
                                                                                    "tool_calls": [CALL]}]})),
     "model", "the model's chat template leaves out the tools list and tool calls, which this data uses", 2),
    ("instruction-data-as-chat", chat_file(line({"prompt": "p", "response": "r"}), line({"prompt": "p",
                                                                                        "completion": "c"})),
     "train_data_path", "has no 'messages' list); expected one CHAT_COMPLETION record per line, in UTF-8 JSON: "
                        '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]} '
                        "(every malformed record is well-formed INSTRUCTION_FINETUNE data: pass "
                        "task_type='INSTRUCTION_FINETUNE')", 1),
    ("chat-data-as-instruction", {**chat_file(GOOD_CHAT), "task_type": "INSTRUCTION_FINETUNE"}, "train_data_path",
     "(every malformed record is well-formed CHAT_COMPLETION data: pass task_type='CHAT_COMPLETION')", 1),
    ("record-extra-key", chat_file(line({"messages": [U, A], "meta": 1})), "train_data_path", "unknown keys ['meta']",
     1),
    ("empty-file", chat_file(""), "train_data_path", "has no records", None),
    ("json-and-shape", chat_file(line({"messages": [U]}), GOOD_CHAT, "{oops"), "train_data_path",
     "2 of 3 records are malformed (line 1: 'messages' must be a list of at least two messages; line 3: is not "
     "valid JSON", 1),   # every problem of a file in one answer, not one per attempt
    ("not-utf8", {"file": ("train.jsonl", b'{"messages": "caf\xe9"}\n')}, "train_data_path", "not UTF-8", 1),
    ("many-bad-lines", chat_file(*[GOOD_CHAT] * 3, *[line({"messages": [U]})] * 9), "train_data_path",
     "9 of 12 records are malformed (line 4: ", 4),
    ("instruction-no-response", {"file": ("i.jsonl", line({"prompt": "p"}) + "\n"), "task_type": "INSTRUCTION_FINETUNE"},
     "train_data_path", "needs 'prompt' and 'response'", 1),
    ("instruction-prompt-number", {"file": ("i.jsonl", line({"prompt": 3, "response": "r"}) + "\n"),
                                   "task_type": "INSTRUCTION_FINETUNE"}, "train_data_path", "must be strings", 1),
    ("instruction-empty-response", {"file": ("i.jsonl", line({"prompt": "p", "response": ""}) + "\n"),
                                    "task_type": "INSTRUCTION_FINETUNE"}, "train_data_path", "'response' is empty", 1),
    ("instruction-unknown-key", {"file": ("i.jsonl", line({"prompt": "p", "response": "r", "x": 1}) + "\n"),
                                 "task_type": "INSTRUCTION_FINETUNE"}, "train_data_path", "unknown keys ['x']", 1),
    ("pretrain-no-txt", {"folder": {"notes.md": "x"}, "task_type": "CONTINUED_PRETRAIN"}, "train_data_path",
     "no .txt files", None),
    ("pretrain-not-utf8", {"folder": {"a.txt": b"\xff\xfe bad"}, "task_type": "CONTINUED_PRETRAIN"},
     "train_data_path", "not UTF-8", None),
    ("pretrain-file-not-folder", {"file": ("a.txt", "text"), "task_type": "CONTINUED_PRETRAIN"}, "train_data_path",
     "is not a folder", None),
    ("pretrain-jsonl-file", {**chat_file(GOOD_CHAT), "task_type": "CONTINUED_PRETRAIN"}, "train_data_path",
     "a folder of .txt files for CONTINUED_PRETRAIN (the records of a .jsonl file, a dataset or a table train with "
     "task_type='CHAT_COMPLETION' or 'INSTRUCTION_FINETUNE')", None),
    ("missing-path", {"train_data_path": "/no/such/train.jsonl"}, "train_data_path", "does not exist", None),
    ("csv-file", {"file": ("train.csv", "a,b\n")}, "train_data_path", "is not a .jsonl file", None),
    ("folder-for-chat", {"folder": {"a.txt": "text"}}, "train_data_path",
     "is a folder; expected a .jsonl file, a Hugging Face dataset or a Delta table for CHAT_COMPLETION (a folder of "
     ".txt files trains with task_type='CONTINUED_PRETRAIN')", None),
    ("unknown-protocol", {"train_data_path": "hdfx://cluster/train.jsonl"}, "train_data_path",
     "fsspec implementation for hdfx://", None),
    ("bad-eval-file", {"eval": ("eval.jsonl", "[1, 2]\n")}, "eval_data_path", "has no 'messages' list", 1),
    ("duration-words", {"training_duration": "two epochs"}, "training_duration", "could not parse", None),
    ("duration-zero", {"training_duration": "0ep"}, "training_duration", "not positive", None),
    ("learning-rate-text", {"learning_rate": "fast"}, "learning_rate", "is not a number", None),
    ("learning-rate-range", {"learning_rate": 5}, "learning_rate", "out of range", None),
    ("register-to-one-part", {"register_to": "main"}, "register_to", "two- or three-part name", None),
    ("register-to-spaces", {"register_to": "main.my schema"}, "register_to", "two- or three-part name", None),
    ("context-too-long", {"context_length": 100_000}, "context_length", "at most 512", None),
    ("context-not-int", {"context_length": "512"}, "context_length", "not a usable length", None),
    ("task-type", {"task_type": "SUMMARIZATION"}, "task_type", "is not a task type", None),
    ("eval-prompts-string", {"eval_prompts": "What is 2+2?"}, "eval_prompts", "not a list of prompts", None),
    ("eval-prompts-empty-item", {"eval_prompts": ["ok", " "]}, "eval_prompts", "not a list of prompts", None),
    ("weights-missing", {"custom_weights_path": "/no/such/checkpoints/ep1-ba10"}, "custom_weights_path",
     "is not a checkpoint folder", None),
    ("model-unknown", {"model": "acme/not-a-model"}, "model", "could not find 'acme/not-a-model'", None),
    ("spark-cluster-id", {"data_prep_cluster_id": "0101-abc"}, "data_prep_cluster_id", "sc://host:port", None),
    ("checkpoint-interval-tokens", {"checkpoint_interval": "1000tok"}, "checkpoint_interval", "counts tokens", None),
    ("checkpoints-to-keep", {"checkpoints_to_keep": 0}, "checkpoints_to_keep", "is not a count", None),
]


def build(case: dict, tmp_path: Path, tiny_model: Path, train: Path) -> dict:
    arguments = {"model": str(tiny_model), "train_data_path": str(train), "register_to": "main.corpus"}
    for key, value in case.items():
        if key == "file":
            name, content = value
            target = tmp_path / name
            target.write_bytes(content if isinstance(content, bytes) else content.encode())
            arguments["train_data_path"] = str(target)
        elif key == "eval":
            name, content = value
            (tmp_path / name).write_text(content)
            arguments["eval_data_path"] = str(tmp_path / name)
        elif key == "folder":
            folder = tmp_path / "folder"
            folder.mkdir()
            for name, content in value.items():
                (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())
            arguments["train_data_path"] = str(folder)
        else:
            arguments[key] = value
    return arguments


def test_the_corpus_is_large_and_distinct():
    assert len(CORPUS) >= 25 and len({case_id for case_id, *_ in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize("case_id, case, parameter, fragment, line", CORPUS, ids=[c[0] for c in CORPUS])
def test_each_bad_input_gets_a_message_that_says_what_to_fix(case_id, case, parameter, fragment, line, tmp_path,
                                                             tiny_model, chat_data):
    with pytest.raises(ValidationError) as caught:
        spec.resolve(**build(case, tmp_path, tiny_model, chat_data[0]))
    error = caught.value
    assert error.parameter == parameter, str(error)
    assert fragment in str(error), str(error)
    assert error.expected, "every message says what was expected"
    assert str(error).startswith(parameter)
    if line is not None:
        assert error.line == line and error.file and f"line {line}" in str(error)
