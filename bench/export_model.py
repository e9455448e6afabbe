"""Export the embedded default model as an mlx-lm model folder.

The benchmarks compare greenroom with mlx-lm (its `generate_step` and its
`mlx_lm.server`) on the exact same weights. greenroom's embedded model is a
GGUF file that mlx-lm cannot read, so this writes what greenroom's own loader
produced (float32 on the CPU) as a folder that both can load:

    config.json         llama, rope_traditional (GGUF rows are permuted), tied embeddings
    model.safetensors   every parameter, as loaded (float32 on the CPU)
    tokenizer.json, tokenizer_config.json, chat_template.jinja, special_tokens_map.json

Usage: .venv/bin/python bench/export_model.py [--out DIR] [--verify] [--force]

`--verify` checks that mlx_lm.load(folder) greedy-generates the same tokens as
the embedded model for a test prompt. Importable: `export_model(out) -> Path`,
`ensure_model() -> Path` (exports once, reuses the folder afterwards).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_OUT = BENCH / "model" / "SmolLM2-135M-Instruct-f32"
_DONE = ".greenroom-export.json"  # written last: a folder without it is incomplete

TEST_MESSAGES = [
    {"role": "system", "content": "You are a concise coding assistant."},
    {"role": "user", "content": "Write a Python function that reverses a string."},
]


def model_config(loaded) -> dict:
    """The mlx-lm config.json of a loaded llama model (from its ModelArgs)."""
    args = dataclasses.asdict(loaded.model.args)
    config = {k: v for k, v in args.items() if v is not None}
    config["model_type"] = "llama"
    config["torch_dtype"] = loaded.dtype
    eos = sorted(loaded.tokenizer.eos_token_ids)
    config["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    return config


def export_model(out: Path = DEFAULT_OUT, loaded=None) -> Path:
    """Write the embedded model (or `loaded`) as an mlx-lm folder at `out`."""
    import actors  # noqa: F401  (preloads OpenBLAS before mlx)
    from actors import loading
    from mlx_lm.utils import save_config, save_model

    out = Path(out)
    loaded = loaded or loading.load()
    if getattr(loaded.model.args, "model_type", "llama") != "llama":
        raise SystemExit(f"only llama models can be exported, not {loaded.model.args.model_type}")
    out.mkdir(parents=True, exist_ok=True)
    (out / _DONE).unlink(missing_ok=True)
    config = model_config(loaded)
    save_model(out, loaded.model)
    save_config(config, out / "config.json")
    hf = loaded.tokenizer._tokenizer
    hf.save_pretrained(str(out))
    if not _has_chat_template(out):
        raise SystemExit(f"the chat template was not saved in {out}")
    (out / _DONE).write_text(
        json.dumps({"source": loaded.source, "tag": loaded.tag, "dtype": loaded.dtype,
                    "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2)
    )
    return out


def _has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    cfg = folder / "tokenizer_config.json"
    return cfg.is_file() and bool(json.loads(cfg.read_text()).get("chat_template"))


def ensure_model(out: Path = DEFAULT_OUT) -> Path:
    """The exported folder, exporting it first if it is missing or incomplete."""
    out = Path(out)
    if not (out / _DONE).is_file():
        print(f"exporting the embedded model to {out} ...", flush=True)
        export_model(out)
    return out


def greedy_tokens(model, tokenizer, messages, n: int) -> list[int]:
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    out = []
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=n):
        out.append(int(token))
    return out


def verify(folder: Path, n: int = 48) -> dict:
    """mlx_lm.load(folder) must greedy-generate what the embedded model does."""
    import actors  # noqa: F401
    from actors import loading
    import mlx_lm

    ref = loading.load()
    model, tokenizer = mlx_lm.load(str(folder))
    p_ref = ref.tokenizer.apply_chat_template(TEST_MESSAGES, add_generation_prompt=True)
    p_new = tokenizer.apply_chat_template(TEST_MESSAGES, add_generation_prompt=True)
    a = greedy_tokens(ref.model, ref.tokenizer, TEST_MESSAGES, n)
    b = greedy_tokens(model, tokenizer, TEST_MESSAGES, n)
    result = {
        "prompt_tokens_equal": p_ref == p_new,
        "prompt_tokens": len(p_ref),
        "generated_equal": a == b,
        "generated": len(a),
        "eos_equal": sorted(ref.tokenizer.eos_token_ids) == sorted(tokenizer.eos_token_ids),
        "text": ref.tokenizer.decode(a),
    }
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--force", action="store_true", help="export even if the folder is complete")
    ap.add_argument("--verify", action="store_true", help="check mlx_lm.load(folder) against the embedded model")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    if args.force or not (args.out / _DONE).is_file():
        export_model(args.out)
        print(f"exported to {args.out} in {time.perf_counter() - started:.1f}s")
    else:
        print(f"{args.out} is already exported (use --force to redo)")
    if args.verify:
        result = verify(args.out)
        print(json.dumps(result, indent=2))
        if not (result["prompt_tokens_equal"] and result["generated_equal"] and result["eos_equal"]):
            print("MISMATCH between the exported folder and the embedded model", file=sys.stderr)
            return 1
        print("OK: mlx_lm.load(folder) generates the same greedy tokens as the embedded model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
