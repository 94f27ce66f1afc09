"""Greedy generation with the Triton kernels vs the reference path, token for token, on a real model.

Usage (CUDA):
    python bench/bench_greedy_parity.py --model /root/m/SmolLM2-135M-Instruct.Q4_1.gguf --data .device/data
        [--length 16384] [--new-tokens 64] [--out bench/results]

For each prompt (passkey trials 0-2 at ``--length`` tokens, and a ``--length``-token window of the
first PG19 book continued as text), ``model.generate`` runs greedily (``do_sample=False``, KV cache:
prefill, then one decode step per token) with ``apply_dca(model, backend="reference")`` and again with
``backend="triton"``. Reported: whether the new tokens are identical, the first step where they
differ (with the reference's top-1/top-2 logit gap there: a near-tie explains a flip), and the max
absolute difference of the prompt's last-token logits, between the two and of each against the same
model in fp32 (reference path): the kernels should be no further from fp32 than the reference path
is. Writes ``greedy_parity.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import chunkllama
from chunkllama.eval.passkey import make_passkey_prompt


def generate(model, ids: torch.Tensor, new_tokens: int, backend: str) -> tuple[list[int], list[torch.Tensor], torch.Tensor]:
    chunkllama.apply_dca(model, backend=backend)
    try:
        with torch.no_grad():
            last_logits = model(ids, logits_to_keep=1).logits[0, -1].float()
            result = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0,
            )
    finally:
        chunkllama.remove_dca(model)
    tokens = result.sequences[0, ids.shape[1]:].tolist()
    return tokens, [s[0].float() for s in result.scores], last_logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help=".gguf file or model directory (SmolLM2-135M-Instruct)")
    parser.add_argument("--data", type=Path, required=True, help="data root holding pg19/")
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_greedy_parity.py needs CUDA.")
    import transformers
    import triton

    model, tokenizer = chunkllama.load_model(args.model, dtype=torch.bfloat16, device="cuda")
    model_fp32, _ = chunkllama.load_model(args.model, dtype=torch.float32, device="cuda")
    prompts = {f"passkey trial {t}": list(make_passkey_prompt(tokenizer, args.length, trial=t, n_trials=3).input_ids)
               for t in range(3)}
    book = sorted(p for p in (args.data / "pg19").glob("*.txt") if "exact" not in p.name)[0]
    book_ids = tokenizer(book.read_text(), add_special_tokens=False).input_ids
    start = max(0, (len(book_ids) - args.length) // 2)
    prompts[f"PG19 {book.name[:30]} continuation"] = book_ids[start:start + args.length]

    rows = []
    for name, prompt in prompts.items():
        ids = torch.tensor([prompt], device="cuda")
        ref_tokens, ref_scores, ref_logits = generate(model, ids, args.new_tokens, "reference")
        tri_tokens, _, tri_logits = generate(model, ids, args.new_tokens, "triton")
        chunkllama.apply_dca(model_fp32, backend="reference")
        with torch.no_grad():
            fp32_logits = model_fp32(ids, logits_to_keep=1).logits[0, -1].float()
        chunkllama.remove_dca(model_fp32)
        first_diff = next((i for i, (a, b) in enumerate(zip(ref_tokens, tri_tokens)) if a != b), None)
        gap = None
        if first_diff is not None:
            top2 = ref_scores[first_diff].topk(2).values
            gap = float(top2[0] - top2[1])
        row = {
            "prompt": name, "prompt_tokens": len(prompt), "new_tokens": args.new_tokens,
            "identical": ref_tokens == tri_tokens, "first_difference": first_diff, "reference_top2_gap_there": gap,
            "prefill_logits_max_abs_diff": float((ref_logits - tri_logits).abs().max()),
            "reference_bf16_vs_fp32_logits": float((ref_logits - fp32_logits).abs().max()),
            "triton_bf16_vs_fp32_logits": float((tri_logits - fp32_logits).abs().max()),
            "reference_text": tokenizer.decode(ref_tokens)[:200], "triton_text": tokenizer.decode(tri_tokens)[:200],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "transformers": transformers.__version__, "model": Path(args.model).name, "dtype": "bfloat16",
            "dca_config": chunkllama.DCAConfig(8192).to_dict()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "greedy_parity.json").write_text(json.dumps({"rows": rows, **info}, indent=1))
    lines = [
        "# Greedy generation: Triton kernels vs reference path, token for token",
        "",
        f"{info['device']}, torch {info['torch']}, triton {info['triton']}, transformers {info['transformers']}; "
        f"{info['model']} in bf16, DCA defaults for its 8192-token window; {args.new_tokens} new tokens.",
        "",
        "| prompt | tokens | identical | first difference | last-token logits: max abs diff triton vs reference "
        "| reference (bf16) vs fp32 | triton (bf16) vs fp32 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        diff = "—" if r["first_difference"] is None else \
            f"step {r['first_difference']} (top-2 gap {r['reference_top2_gap_there']:.3f})"
        lines.append(f"| {r['prompt']} | {r['prompt_tokens']} | {'yes' if r['identical'] else 'no'} | {diff} | "
                     f"{r['prefill_logits_max_abs_diff']:.4f} | {r['reference_bf16_vs_fp32_logits']:.4f} | "
                     f"{r['triton_bf16_vs_fp32_logits']:.4f} |")
    (args.out / "greedy_parity.md").write_text("\n".join(lines + [""]))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
