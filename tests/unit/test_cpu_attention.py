"""The CPU attention computes what MLX's own kernel computes, for every mask mlx-lm passes."""

from __future__ import annotations

import actors  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import pytest
from mlx_lm.models import llama
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import BatchKVCache, make_prompt_cache

from actors import cpu_attention

TOL = 2e-5


def _qkv(b, heads, kv_heads, q_len, k_len, dim=32, seed=0):
    mx.random.seed(seed)
    return (mx.random.normal((b, heads, q_len, dim)), mx.random.normal((b, kv_heads, k_len, dim)),
            mx.random.normal((b, kv_heads, k_len, dim)))


def _close(mask, *qkv_args):
    q, k, v = _qkv(*qkv_args)
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.17, mask=mask)
    got = cpu_attention.cpu_attention(q, k, v, 0.17, mask)
    assert got.shape == want.shape
    return mx.abs(got - want).max().item()


@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4), (8, 1)])
@pytest.mark.parametrize("b,q_len,k_len", [(1, 1, 1), (1, 1, 300), (3, 1, 300), (1, 64, 64), (2, 37, 200)])
def test_matches_mlx_without_mask_and_causal(heads, kv_heads, b, q_len, k_len):
    assert _close(None, b, heads, kv_heads, q_len, k_len) < TOL
    assert _close("causal", b, heads, kv_heads, q_len, k_len) < TOL


def test_matches_mlx_with_batch_padding_masks():
    # What BatchKVCache builds: left padding of the merged caches, right padding of prompts.
    left = mx.array([0, 5, 17])
    right = mx.array([3, 0, 1])
    mask = create_causal_mask(12, offset=40, left_padding=left, right_padding=right)
    assert mask.shape == (3, 1, 12, 52)
    assert _close(mask, 3, 9, 3, 12, 52) < TOL
    decode = create_causal_mask(1, offset=51, left_padding=left)
    assert _close(decode, 3, 9, 3, 1, 52) < TOL


def test_matches_mlx_with_additive_and_per_head_masks():
    mx.random.seed(3)
    additive = mx.where(mx.random.uniform(shape=(10, 30)) < 0.8, 0.0, -mx.inf)
    additive[:, 0] = 0.0  # no fully masked row
    assert _close(additive, 2, 6, 2, 10, 30) < TOL
    per_head = mx.random.uniform(shape=(2, 6, 10, 30)) < 0.7
    per_head[..., 0] = True
    assert _close(per_head, 2, 6, 2, 10, 30) < TOL


def test_fully_masked_rows_give_zeros_not_nan():
    q, k, v = _qkv(1, 2, 1, 4, 8)
    mask = mx.ones((4, 8), dtype=mx.bool_)
    mask[1] = False
    out = cpu_attention.cpu_attention(q, k, v, 0.2, mask)
    assert not mx.isnan(out).any().item()
    assert mx.abs(out[:, :, 1]).max().item() == 0.0


def _tiny_llama(seed=0):
    mx.random.seed(seed)
    args = llama.ModelArgs.from_dict({
        "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
        "num_attention_heads": 6, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": 97,
    })
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


def _prefill_then_decode(model, tokens, steps=6):
    cache = make_prompt_cache(model)
    logits = model(mx.array([tokens[:-8]]), cache=cache)
    logits = model(mx.array([tokens[-8:]]), cache=cache)  # a second chunk at an offset
    out = [logits[0, -1]]
    nxt = mx.argmax(logits[:, -1], axis=-1)
    for _ in range(steps):
        logits = model(nxt[:, None], cache=cache)
        out.append(logits[0, -1])
        nxt = mx.argmax(logits[:, -1], axis=-1)
    return mx.stack(out)


def test_installed_model_gives_the_same_logits_alone_and_in_a_padded_batch():
    model = _tiny_llama()
    prompts = [list(range(3, 40)), list(range(10, 30)), list(range(50, 95))]
    cpu_attention.uninstall_all()
    try:
        stock = [_prefill_then_decode(model, p) for p in prompts]
        assert cpu_attention.install(model)
        assert cpu_attention.install(model)  # idempotent
        ours = [_prefill_then_decode(model, p) for p in prompts]
        for a, b in zip(stock, ours):
            assert mx.abs(a - b).max().item() < 1e-4
        # A left-padded batch (merged caches of different lengths) through the
        # installed function: each row's next-token logits match its solo run.
        caches = []
        for p in prompts:
            c = make_prompt_cache(model)
            model(mx.array([p]), cache=c)
            caches.append(c)
        merged = [BatchKVCache.merge([c[i] for c in caches]) for i in range(len(caches[0]))]
        last = mx.array([[7], [8], [9]])
        batched = model(last, cache=merged)[:, -1]
        for row, (p, c) in enumerate(zip(prompts, caches)):
            solo = make_prompt_cache(model)
            model(mx.array([p]), cache=solo)
            want = model(last[row:row + 1], cache=solo)[0, -1]
            assert mx.abs(batched[row] - want).max().item() < 1e-4
    finally:
        cpu_attention.uninstall_all()
    assert not getattr(llama.scaled_dot_product_attention, "greenroom", False)


def test_blocked_path_matches_mlx(monkeypatch):
    # Small blocks force every split: per sequence, and several row blocks each.
    monkeypatch.setattr(cpu_attention, "BLOCK_ELEMENTS", 2000)
    assert _close("causal", 3, 9, 3, 50, 120) < TOL
    assert _close(None, 2, 4, 4, 33, 70) < TOL
    left = mx.array([0, 9])
    assert _close(create_causal_mask(40, offset=20, left_padding=left), 2, 6, 2, 40, 60) < TOL
    per_head = mx.random.uniform(shape=(2, 6, 40, 60)) < 0.7
    per_head[..., 0] = True
    assert _close(per_head, 2, 6, 2, 40, 60) < TOL
