"""Chat templates as real model folders ship them (tokenizer_config.json's `chat_template`),
and conversations to render them with. Jinja source: `\\n` inside a Jinja string literal is
Jinja's escape, as in the JSON files."""

from __future__ import annotations

# Qwen2-Instruct / Qwen2-57B-A14B-Instruct (and Qwen1.5-MoE-A2.7B-Chat): ChatML with a default
# system prompt.
QWEN2 = (
    r"{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    r"{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    r"{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    r"{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen3 (Qwen3-30B-A3B, Qwen3-235B-A22B), without its tool-call branches: namespaces, reversed
# loops, string methods, reasoning kept only after the last user turn.
QWEN3 = r"""{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

# Mixtral-8x7B-Instruct-v0.1's current template: an optional system message joined to the first
# user turn, raise_exception when roles do not alternate.
MIXTRAL = r"""{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""

# Mixtral-8x7B-Instruct-v0.1's first template: no system role at all (raise_exception).
MIXTRAL_V0 = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant "
    "roles are supported!') }}{% endif %}{% endfor %}"
)

# OLMoE-1B-7B-0924-Instruct (Tulu): bos_token, eos_token inside the turns.
OLMOE = (
    r"{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
    r"{{ '<|system|>\n' + message['content'] + '\n' }}{% elif message['role'] == 'user' %}"
    r"{{ '<|user|>\n' + message['content'] + '\n' }}{% elif message['role'] == 'assistant' %}"
    r"{% if not loop.last %}{{ '<|assistant|>\n'  + message['content'] + eos_token + '\n' }}"
    r"{% else %}{{ '<|assistant|>\n'  + message['content'] + eos_token }}{% endif %}{% endif %}"
    r"{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}{% endfor %}"
)

# Zephyr-style, written without '-': only trim_blocks and lstrip_blocks keep the block tags'
# lines and indentation out of the prompt.
BLOCKS = """{% for message in messages %}
    {% if message['role'] == 'system' %}
<|system|>
{{ message['content'] }}{{ eos_token }}
    {% elif message['role'] == 'user' %}
<|user|>
{{ message['content'] }}{{ eos_token }}
    {% else %}
<|assistant|>
{{ message['content'] }}{{ eos_token }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|assistant|>
{% endif %}"""

# transformers' extras: namespace, loop controls, tojson (non-ASCII kept, no HTML escaping),
# dict(), strftime_now, and the {% generation %} block.
EXTRAS = """{%- set ns = namespace(n=0) -%}
{%- for m in messages -%}
{%- if m.role == 'system' %}{% continue %}{% endif -%}
{%- set ns.n = ns.n + 1 -%}
{% generation %}<|im_start|>{{ ns.n }} {{ m | tojson }}<|im_end|>
{% endgeneration %}
{%- endfor -%}
{{ dict(a="<&>", b=[1, 2]) | tojson(indent=1) }} {{ strftime_now('%Y') | length }}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

SYSTEM = "You are a terse assistant. Answer in one line."
CONVERSATIONS = {
    "one_turn": [{"role": "user", "content": "What is the capital of France?"}],
    "system": [{"role": "system", "content": SYSTEM},
               {"role": "user", "content": "And of Japan? 日本 😀"}],
    "multi_turn": [{"role": "system", "content": SYSTEM},
                   {"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": "Hello! 👋"},
                   {"role": "user", "content": "Bye\nnow"}],
    "no_system_multi": [{"role": "user", "content": "2+2?"},
                        {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"},
                        {"role": "user", "content": "3+3?"}],
    "continued": [{"role": "user", "content": "Name a colour."},
                  {"role": "assistant", "content": "Blue, or"}],
}
