"""Chat templates of the model families this project trains, written from their documented formats.

Used to build local tokenizers (the toy run, the tests) that behave like the real ones; a real model's
tokenizer brings its own template and these are never applied over it.
"""

LLAMA3_TEMPLATE = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
"""Llama 3 / 3.1 Instruct: ``<|begin_of_text|>`` once, a header per turn, ``<|eot_id|>`` ends each turn."""

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""ChatML as Qwen2 writes it: a default system turn, ``<|im_end|>`` then a newline ends each turn."""

MISTRAL_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}"
    "{% endfor %}"
)
"""Mistral Instruct v0.1/v0.2: ``[INST] ... [/INST]``, the answer ends with ``</s>``; no system role."""

SPECIAL_TOKENS = {
    "llama3": {
        "bos": "<|begin_of_text|>",
        "eos": "<|eot_id|>",
        "extra": ["<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"],
    },
    "chatml": {"bos": None, "eos": "<|im_end|>", "extra": ["<|im_start|>", "<|endoftext|>"]},
    "mistral": {"bos": "<s>", "eos": "</s>", "extra": ["<unk>", "[INST]", "[/INST]"]},
}
"""Special tokens of each family; ``eos`` is the end-of-turn token of its instruct tokenizer."""

TEMPLATES = {"llama3": LLAMA3_TEMPLATE, "chatml": CHATML_TEMPLATE, "mistral": MISTRAL_TEMPLATE}
