"""Peak memory of a long prefill: DCA (reference path) vs the unpatched model with SDPA.

Usage (GPU; the model's shapes are what matter, so random weights are the default):
    python bench/bench_memory.py --lengths 16384 32768 [--model PATH_OR_GGUF] [--out bench/results]

For each length it runs one forward of ``input_ids (1, T)`` under ``torch.no_grad`` twice — the
unpatched model (``attn_implementation="sdpa"``), then the same instance with
``apply_dca(model, 8192, backend="reference")`` — and records ``torch.cuda.max_memory_allocated``
above the weights. ``logits_to_keep=1`` so the (identical) vocabulary projection does not hide the
attention's cost. Writes ``memory.json`` and ``memory.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
import transformers

import chunkllama

SMOLLM2_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
    rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
)


def build_model(name: str | None, device: str, dtype: torch.dtype) -> torch.nn.Module:
    if name:
        model, _ = chunkllama.load_model(name, dtype=dtype, device=device)
        model.config._attn_implementation = "sdpa"
        return model
    config = transformers.LlamaConfig(**SMOLLM2_135M)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).to(dtype)
    return model.eval()


def peak_forward_bytes(model: torch.nn.Module, length: int, device: str, use_cache: bool) -> int:
    ids = torch.randint(0, model.config.vocab_size, (1, length), device=device)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        out = model(ids, use_cache=use_cache, logits_to_keep=1)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768])
    parser.add_argument("--model", default=None, help="HF dir/id or .gguf; default: random SmolLM2-135M shapes")
    parser.add_argument("--pretraining-length", type=int, default=8192)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_memory.py measures CUDA memory; run it on a GPU machine.")
    device, dtype = "cuda", torch.bfloat16
    model = build_model(args.model, device, dtype)
    rows = []
    for length in args.lengths:
        for use_cache in (False, True):
            chunkllama.remove_dca(model)
            sdpa = peak_forward_bytes(model, length, device, use_cache)
            chunkllama.apply_dca(model, args.pretraining_length, backend="reference")
            dca = peak_forward_bytes(model, length, device, use_cache)
            row = {
                "bench": "memory", "T": length, "use_cache": use_cache,
                "sdpa_peak_mib": round(sdpa / 2**20, 1), "dca_reference_peak_mib": round(dca / 2**20, 1),
                "ratio": round(dca / sdpa, 3),
                "dca_config": chunkllama.get_dca_config(model).to_dict(),
                "model": args.model or "random SmolLM2-135M shapes", "dtype": str(dtype),
                "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                "transformers": transformers.__version__, "python": platform.python_version(),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    chunkllama.remove_dca(model)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = [
        f"# Peak prefill memory above weights — {rows[0]['device']}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, {rows[0]['model']}, bf16, batch 1, logits_to_keep=1",
        "", "| T | use_cache | SDPA (MiB) | DCA reference (MiB) | ratio |", "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['T']} | {r['use_cache']} | {r['sdpa_peak_mib']} | {r['dca_reference_peak_mib']} | {r['ratio']} |"
        for r in rows
    ]
    lines += ["", "Reproduce: `python bench/bench_memory.py --lengths " + " ".join(map(str, args.lengths)) + "`"]
    (args.out / "memory.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
