"""A tiny Llama-shaped model and a tokenizer trained here, so tests run the real code paths in seconds."""
from __future__ import annotations

from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# ChatML that also writes out tools (in the system turn), tool calls (as <tool_call>{json}</tool_call>) and tool
# results (a "tool" turn), the way tool-calling chat models' templates do.
TOOLS_CHATML_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n{% endif %}"
    "You may call these tools:\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and tools %}"
    "{% elif message['role'] == 'assistant' and message.tool_calls %}<|im_start|>assistant\n"
    "{% if message.content %}{{ message.content }}\n{% endif %}"
    "{% for call in message.tool_calls %}<tool_call>"
    "{{ {'name': call.function.name, 'arguments': call.function.arguments} | tojson }}</tool_call>{% endfor %}"
    "<|im_end|>\n"
    "{% else %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "what is the capital of france? the capital of france is paris.",
    "hello there, how are you today? i am fine, thank you.",
    "one two three four five six seven eight nine ten",
    "a model learns to answer questions about numbers and cities",
] * 20


def build_tiny_model(folder: Path, *, vocab_size: int = 384, hidden_size: int = 64, layers: int = 2,
                     max_positions: int = 512, eos_token: str = "<|im_end|>",
                     chat_template: str = CHATML_TEMPLATE) -> Path:
    """A chat model whose EOS ends its turns; `eos_token="<|endoftext|>"` makes it base-model-like (its EOS ends
    documents, its chat template ends turns with <|im_end|>, as Qwen2.5's base models do)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    raw = Tokenizer(models.BPE(unk_token=None))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    raw.train_from_iterator(CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<|im_start|>", eos_token=eos_token, pad_token=eos_token,
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    return folder


def write_chat_jsonl(path: Path, count: int = 24) -> Path:
    import json

    questions = [("what is the capital of france?", "the capital of france is paris."),
                 ("hello there, how are you today?", "i am fine, thank you."),
                 ("count to five", "one two three four five"),
                 ("what jumps over the lazy dog?", "the quick brown fox jumps over the lazy dog")]
    with path.open("w") as handle:
        for i in range(count):
            q, a = questions[i % len(questions)]
            messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            if i % 3 == 0:
                messages = [{"role": "system", "content": "be brief"}] + messages
            handle.write(json.dumps({"messages": messages}) + "\n")
    return path
