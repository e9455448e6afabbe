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
    from mlx_lm.models import llama

    path.mkdir(parents=True, exist_ok=True)
    _, meta = mx.load(str(loading.embedded_gguf_path()), return_metadata=True)
    tokenizer = loading._gguf_tokenizer(meta)
    config = {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": hidden * 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "tie_word_embeddings": True,
        "max_position_embeddings": 2048,
        "eos_token_id": tokenizer.eos_token_id,
    }
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (path / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer._tokenizer.save_pretrained(str(path))
    return path


def write_corrupt_model(path: Path) -> Path:
    """A folder that looks like a model but whose weights are garbage."""
    write_tiny_llama(path)
    (path / "model.safetensors").write_bytes(b"\x00garbage" * 1000)
    return path
