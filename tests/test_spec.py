"""Parsing and validation of create()'s arguments: errors name the parameter, the file, the line and the fix."""
from __future__ import annotations

import json

import pytest

from ray_finetune import spec
from ray_finetune.errors import ValidationError


@pytest.mark.parametrize("text, value, unit", [
    ("1ep", 1, "ep"), ("2ep", 2, "ep"), ("100ba", 100, "ba"), ("1_000_000tok", 1_000_000, "tok"), (" 3ep ", 3, "ep"),
])
def test_duration_parses(text, value, unit):
    assert spec.parse_duration(text) == spec.Duration(value=value, unit=unit)


def test_duration_defaults_to_one_epoch():
    assert str(spec.parse_duration(None)) == "1ep"


@pytest.mark.parametrize("text", ["", "ep", "2", "2 epochs", "-1ep", "0ba", "1.5ep", "10steps"])
def test_bad_duration_names_the_parameter_and_the_forms(text):
    with pytest.raises(ValidationError) as error:
        spec.parse_duration(text)
    assert error.value.parameter == "training_duration"
    assert "ep" in str(error.value) and "tok" in str(error.value)


@pytest.mark.parametrize("text, full", [("main.demo", "main.demo.run-x"), ("main.demo.chatbot", "main.demo.chatbot")])
def test_register_to(text, full):
    assert spec.parse_register_to(text).full_name("run-x") == full


@pytest.mark.parametrize("text", ["main", "a.b.c.d", "main..x", "main.demo.my model", ""])
def test_bad_register_to(text):
    with pytest.raises(ValidationError, match="register_to"):
        spec.parse_register_to(text)


@pytest.mark.parametrize("value, expected", [(None, 5e-6), ("1e-4", 1e-4), (3e-5, 3e-5)])
def test_learning_rate(value, expected):
    assert spec.parse_learning_rate(value) == expected


@pytest.mark.parametrize("value", ["fast", -1, 0, 2])
def test_bad_learning_rate(value):
    with pytest.raises(ValidationError, match="learning_rate"):
        spec.parse_learning_rate(value)


def _resolve(tiny_model, train, **overrides):
    arguments = dict(model=str(tiny_model), train_data_path=str(train), register_to="main.demo")
    arguments.update(overrides)
    return spec.resolve(**arguments)


def test_resolve_fills_every_default(tiny_model, chat_data):
    resolved = _resolve(tiny_model, chat_data[0])
    assert resolved.training_duration == "1ep"
    assert resolved.learning_rate == 5e-6
    assert resolved.context_length == 512  # min(8192, the tiny model's maximum)
    assert resolved.task_type == "CHAT_COMPLETION"
    assert resolved.created_by


def test_context_length_longer_than_the_model_is_refused(tiny_model, chat_data):
    with pytest.raises(ValidationError, match="context_length.*at most 512"):
        _resolve(tiny_model, chat_data[0], context_length=4096)


def test_unknown_model_says_what_was_tried(chat_data):
    with pytest.raises(ValidationError) as error:
        spec.resolve(model="nobody/no-such-model", train_data_path=str(chat_data[0]), register_to="main.demo")
    assert error.value.parameter == "model"
    assert "nobody/no-such-model" in str(error.value) and "Hugging Face cache" in str(error.value)


def test_bad_lines_are_reported_with_file_line_and_count(tiny_model, tmp_path):
    path = tmp_path / "bad.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    lines = [good, {"messages": [{"role": "user", "content": "hi"}]}, good,
             {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                           {"role": "assistant", "content": "c"}]},
             {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    with pytest.raises(ValidationError) as error:
        _resolve(tiny_model, path)
    message = str(error.value)
    assert error.value.parameter == "train_data_path" and error.value.file == str(path) and error.value.line == 2
    assert "3 of 5 records" in message and "line 4" in message and "alternate" in message
    assert "last message must be from the assistant" in message


@pytest.mark.parametrize("content, problem", [
    ('{"messages": [}\n', "not valid JSON"),
    ('{"prompt": "x", "response": "y"}\n', "no 'messages'"),
    ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}\n', "neither a string"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "x"}]}\n', "system"),
    ('{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "x"}]}\n', "role 'robot'"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "extra": 1}\n',
     "unknown keys"),
    ("\n\n", "has no records"),
])
def test_each_malformed_chat_file_gets_its_own_message(tiny_model, tmp_path, content, problem):
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    with pytest.raises(ValidationError, match=problem):
        _resolve(tiny_model, path)


def test_wrong_file_kind_and_missing_paths(tiny_model, tmp_path, chat_data):
    with pytest.raises(ValidationError, match="does not exist"):
        _resolve(tiny_model, tmp_path / "missing.jsonl")
    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(ValidationError, match="not a .jsonl file"):
        _resolve(tiny_model, tmp_path / "notes.csv")
    with pytest.raises(ValidationError, match="no .txt files"):
        _resolve(tiny_model, tmp_path, task_type="CONTINUED_PRETRAIN")
    with pytest.raises(ValidationError, match="task_type"):
        _resolve(tiny_model, chat_data[0], task_type="SUMMARIZE")
    with pytest.raises(ValidationError, match="custom_weights_path"):
        _resolve(tiny_model, chat_data[0], custom_weights_path=str(tmp_path))
    with pytest.raises(ValidationError, match="eval_prompts"):
        _resolve(tiny_model, chat_data[0], eval_prompts="just one string")


def test_instruction_records(tiny_model, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "2+2=", "response": "4"}\n{"prompt": "3+3=", "completion": "6"}\n')
    assert _resolve(tiny_model, path, task_type="INSTRUCTION_FINETUNE").task_type == "INSTRUCTION_FINETUNE"
    path.write_text('{"prompt": "2+2="}\n')
    with pytest.raises(ValidationError, match="needs 'prompt' and 'response'"):
        _resolve(tiny_model, path, task_type="INSTRUCTION_FINETUNE")


def test_a_model_without_a_chat_template_is_refused_for_chats_before_queueing(tiny_model, chat_data, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    (base / "chat_template.jinja").unlink()   # a base model: no template to format conversations with
    with pytest.raises(ValidationError, match="no chat template") as error:
        _resolve(base, chat_data[0])
    assert error.value.parameter == "model" and "INSTRUCTION_FINETUNE" in str(error.value)
    instructions = tmp_path / "instructions.jsonl"
    instructions.write_text('{"prompt": "2+2=", "response": "4"}\n')
    assert _resolve(base, instructions, task_type="INSTRUCTION_FINETUNE").model_path == str(base)


def test_a_chat_template_whose_turns_cannot_be_located_is_refused_before_queueing(chat_data, tmp_path):
    """A template that rewrites the conversation as it grows (here: a header counting its messages) gives no
    stable place for each assistant turn; that is said at create(), not by a failed run."""
    from tiny_model import CHATML_TEMPLATE, build_tiny_model

    model = build_tiny_model(tmp_path / "counting", chat_template="{{ messages | length }} messages\n" + CHATML_TEMPLATE)
    with pytest.raises(ValidationError, match="does not render conversations incrementally") as error:
        _resolve(model, chat_data[0])
    assert error.value.parameter == "model"


def test_text_that_is_not_utf8_is_named(tiny_model, tmp_path):
    (tmp_path / "doc.txt").write_bytes(b"caf\xe9 latin-1")
    with pytest.raises(ValidationError, match="not UTF-8") as error:
        _resolve(tiny_model, tmp_path, task_type="CONTINUED_PRETRAIN")
    assert error.value.file.endswith("doc.txt")
