"""The parts of our dependencies greenroom relies on beyond their documented API.

pyproject.toml pins the ranges these were verified with (mlx-lm 0.32.x, mlx 0.32.x,
llguidance 1.x). When an upgrade changes one of them, the test here that names it
fails with a message saying what greenroom needs, instead of the server failing in
a step or a restore at run time.
"""

from __future__ import annotations

import inspect
import sys

import actors  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx


def test_model_modules_call_the_base_attention_function_by_module_name():
    """actors/ragged.py and actors/cpu_attention.py rebind `scaled_dot_product_attention`
    in the model's module: that only works while models import it from mlx_lm.models.base
    and call it by that module-level name."""
    from mlx_lm.models import base, llama, qwen2, qwen3

    assert callable(base.scaled_dot_product_attention)
    for module in (llama, qwen2, qwen3):
        assert getattr(module, "scaled_dot_product_attention", None) is not None, (
            f"{module.__name__} no longer imports scaled_dot_product_attention: the ragged "
            "batch (actors/ragged.py) cannot reach its attention"
        )
        source = inspect.getsource(module)
        assert "cache.update_and_fetch(keys, values)" in source and "offset=cache.offset" in source, (
            f"{module.__name__}'s attention no longer uses cache.update_and_fetch / cache.offset"
        )


def test_kv_cache_growth_follows_its_step_attribute():
    """actors/engine.py sizes a prompt's KV arrays once by setting KVCache.step."""
    from mlx_lm.models.cache import KVCache

    cache = KVCache()
    cache.step = 1024
    cache.update_and_fetch(mx.zeros((1, 2, 10, 4)), mx.zeros((1, 2, 10, 4)))
    assert cache.keys.shape[2] == 1024, "KVCache no longer grows by its `step`"
    cache.trim(4)
    assert cache.offset == 6, "KVCache.trim no longer moves the offset (actors/session.py trims to the common prefix)"


def test_ragged_batch_decodes_like_one_sequence_at_a_time():
    """The whole seam end to end on a tiny llama: a ragged batch of two sequences of
    different lengths gives each the logits it gets alone."""
    from mlx_lm.models import llama
    from mlx_lm.models.cache import make_prompt_cache

    from actors import ragged

    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict({
        "model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": 50,
    }))
    assert ragged.install(model), "the model's module lost the attention seam"
    prompts = [[1, 2, 3, 4, 5], [6, 7]]
    caches = []
    for p in prompts:
        c = make_prompt_cache(model)
        model(mx.array([p]), cache=c)
        caches.append(c)
    alone = [model(mx.array([[9]]), cache=c) for c in caches]
    for c in caches:
        for layer in c:
            layer.trim(1)
    both = model(mx.array([[9], [9]]), cache=ragged.ragged_caches(caches))
    for i in range(2):
        assert mx.allclose(both[i], alone[i][0], atol=1e-5).item()


def test_tokenizer_wrapper_exposes_tool_and_thinking_markers():
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    for name in ("has_tool_calling", "tool_call_start", "tool_call_end", "tool_parser",
                 "has_thinking", "think_start", "think_end", "detokenizer", "eos_token_ids"):
        assert hasattr(TokenizerWrapper, name), f"TokenizerWrapper lost `{name}` (actors/prompt.py, output.py)"


def test_text_state_machine_and_tool_parsers():
    from mlx_lm.generate import TextStateMachine, make_text_state_machine
    from mlx_lm.tool_parsers import json_tools

    machine = TextStateMachine({"normal": [("<a>", "x")], "x": [("</a>", "normal")]})
    state, segments = TextStateMachine.split(machine.make_state("normal"), "hi<a>yo</a>!")
    assert [s for s in segments if s[1]] == [("normal", "hi"), ("x", "yo"), ("normal", "!")]
    assert callable(make_text_state_machine)
    assert json_tools.parse_tool_call('{"name": "f", "arguments": {}}') == {"name": "f", "arguments": {}}


def test_private_names_the_loader_uses():
    """actors/loading.py resolves repo ids with mlx_lm.utils._download (private)."""
    from mlx_lm import utils

    for name in ("_download", "load_model", "load_tokenizer", "dequantize_model"):
        assert callable(getattr(utils, name, None)), f"mlx_lm.utils.{name} is gone (actors/loading.py)"
    assert "mlx_lm" in sys.modules
