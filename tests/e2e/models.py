"""Model folders the tests generate and load through the real loading code."""

from __future__ import annotations

import json
from pathlib import Path

import actors  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
from mlx.utils import tree_flatten

from actors import loading


def write_tiny_llama(path: Path, *, seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    """A random-weight Llama with the embedded model's tokenizer, as an mlx-lm folder."""
    path.mkdir(parents=True, exist_ok=True)
    _, meta = mx.load(str(loading.embedded_gguf_path()), return_metadata=True)
    tokenizer = loading._gguf_tokenizer(meta)
    vocab_size = len(meta["tokenizer.ggml.tokens"])
    _write_random_llama_weights(path, seed, hidden, layers, vocab_size, tokenizer.eos_token_id)
    tokenizer._tokenizer.save_pretrained(str(path))
    return path


def _write_random_llama_weights(
    path: Path, seed: int, hidden: int, layers: int, vocab_size: int, eos_token_id: int
) -> None:
    """config.json and model.safetensors of a small Llama with random weights."""
    from mlx_lm.models import llama

    config = {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": hidden * 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab_size,
        "tie_word_embeddings": True,
        "max_position_embeddings": 2048,
        "eos_token_id": eos_token_id,
    }
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (path / "config.json").write_text(json.dumps(config, indent=2))


# Qwen3's chat template (ChatML, tools in the system turn, calls as <tool_call> JSON,
# tool results as <tool_response> user turns, think blocks), as its tokenizer_config.json has it.
QWEN3_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
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
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

# Added as Qwen adds them: ordinary (not "special") added tokens, never normalized.
QWEN_ADDED_TOKENS = ("<tool_call>", "</tool_call>", "<think>", "</think>")


def write_tiny_qwen_tools(
    path: Path, *, seed: int = 0, hidden: int = 64, layers: int = 2, chat_template: str | None = None
) -> Path:
    """A random-weight Llama whose tokenizer and chat template look like Qwen3's: the
    embedded vocabulary plus <tool_call>, </tool_call>, <think>, </think> as added
    tokens, and a ChatML template with tools (mlx-lm infers the json_tools parser
    and thinking from it). `chat_template` replaces Qwen3's template."""
    from tokenizers import AddedToken

    path.mkdir(parents=True, exist_ok=True)
    _, meta = mx.load(str(loading.embedded_gguf_path()), return_metadata=True)
    tokenizer = loading._gguf_tokenizer(meta)._tokenizer
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_ADDED_TOKENS])
    _write_random_llama_weights(path, seed, hidden, layers, len(tokenizer), tokenizer.eos_token_id)
    tokenizer.save_pretrained(str(path))
    # As Qwen's repositories ship it: the template inside tokenizer_config.json.
    (path / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer_config = json.loads((path / "tokenizer_config.json").read_text())
    tokenizer_config["chat_template"] = chat_template or QWEN3_CHAT_TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return path


def write_corrupt_model(path: Path) -> Path:
    """A folder that looks like a model but whose weights are garbage."""
    write_tiny_llama(path)
    (path / "model.safetensors").write_bytes(b"\x00garbage" * 1000)
    return path
