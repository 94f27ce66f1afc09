"""Tensor-parallel DCA under ``torchrun`` (issue 13): correctness, the longest prompt, prefill throughput.

Usage (2 GPUs of one host; random bf16 weights built there, nothing downloaded):
    torchrun --nproc-per-node 2 bench/bench_tp.py --phase correctness          # 70B shapes, 2 layers, 12k prompt
    python bench/bench_tp.py --phase reference                                 # the same on one GPU; compares
    torchrun --nproc-per-node 2 bench/bench_tp.py --phase longest --lengths 256k 384k [--kv-dtype fp8]
    torchrun --nproc-per-node 2 bench/bench_tp.py --phase throughput --length 32k
    torchrun --nproc-per-node 2 bench/bench_tp.py --smoke --phase correctness && python bench/bench_tp.py --smoke \\
        --phase reference        # the CPU (gloo): a tiny Llama, 2 layers, DCA for a 256-token window

Models load through ``from_pretrained`` with ``tp_plan="auto"``
(:func:`chunkllama.distributed.from_pretrained_kwargs`), as a user's would:

- ``correctness``/``reference``: a checkpoint of ``--shape`` cut to ``--layers`` layers with HF's random
  init (seed 0) is saved once (``--work``); ``correctness`` loads it over all ranks, ``reference`` in
  one process on one device. Both patch it with DCA and record the prompt's last-token logits and
  ``--new-tokens`` greedy tokens (a random prompt of ``--prompt-tokens``); ``reference`` compares them.
- ``longest``/``throughput``: full depth. Random 70B weights are too large to save on the machine's disk
  (140 GB), so the checkpoint is a *sparse* safetensors file (header written, data left as a hole:
  no disk used, reads as zeros) and every rank then fills its own shards in place with random values
  (the same seed for a tensor on every rank, so replicated tensors agree). ``longest``: one ``generate``
  per length with DCA and the prefill in pieces; ok / prefill seconds / decode tokens per second / peak
  memory of each GPU, beside :func:`chunkllama.planner.make_plan`'s prediction for the same run.
  ``throughput``: prefill of ``--length`` tokens, DCA vs the unpatched model (SDPA), alternating,
  best of two each.

Rank 0 merges its rows into ``OUT/tp.json`` and rewrites ``OUT/tp.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import struct
import sys
import time
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

sys.path.insert(0, str(Path(__file__).resolve().parent))

import chunkllama  # noqa: E402
from chunkllama.distributed import check_heads_split, from_pretrained_kwargs, is_main_process, world_size  # noqa: E402
from chunkllama.planner import GIB, SHAPES, Shape, make_plan, parse_size  # noqa: E402
from chunkllama.prefill import enable_chunked_prefill, resolve_prefill_chunk_size  # noqa: E402
from run_info import apply_smoke, merge_rows  # noqa: E402

SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
#: the built-in shapes, and a tiny one whose heads split over 2 ranks for the CPU smoke run
BENCH_SHAPES = {**SHAPES, "tiny-llama": dict(model_type="llama", hidden_size=128, intermediate_size=256,
                                             num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                                             vocab_size=512, max_position_embeddings=256, tie_word_embeddings=False)}
SMOKE = {"shape": "tiny-llama", "layers": 2, "pretraining_length": 256, "prompt_tokens": 700,
         "lengths": ["1024"], "length": "1024", "new_tokens": 6}


def shape_config(shape: str, layers: int | None) -> transformers.PretrainedConfig:
    """A transformers config of a :data:`BENCH_SHAPES` entry, optionally cut to ``layers``."""
    fields = dict(BENCH_SHAPES[shape])
    if layers:
        fields["num_hidden_layers"] = layers
    return transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)


def write_random_checkpoint(directory: Path, config, dtype: torch.dtype, seed: int = 0) -> None:
    """``save_pretrained`` of a model built from ``config`` with HF's random init (``seed``)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(directory)


def write_sparse_checkpoint(directory: Path, config, dtype: torch.dtype) -> int:
    """A checkpoint of ``config`` whose one ``model.safetensors`` holds its header and a hole for the data.

    The file has its full size but no data blocks: it takes no disk space and every weight reads as
    zero. Returns the file's size in bytes.
    """
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, tensor in model.state_dict().items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    path = directory / "model.safetensors"
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        f.truncate(8 + len(encoded) + offset)
    return path.stat().st_size


def fill_random(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights in place, shard by shard (DTensor parameters fill their local part): norms 1,
    everything else N(0, 0.02). A tensor's seed depends on its index only, so replicated tensors
    get the same values on every rank."""
    with torch.no_grad():
        for index, (name, param) in enumerate(model.named_parameters()):
            local = param.to_local() if hasattr(param, "to_local") else param
            if "norm" in name:
                local.fill_(1.0)
            else:
                gen = torch.Generator(device=local.device).manual_seed(seed + index)
                local.normal_(0.0, 0.02, generator=gen)


def load(directory: Path, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """``from_pretrained`` over all ranks under ``torchrun`` (tensor parallel), else onto ``device``."""
    kwargs = from_pretrained_kwargs()
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation="sdpa",
                                                              **kwargs)
    if not kwargs:
        model = model.to(device)
    return model.eval()


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The full tensor of a DTensor (gathered from the ranks), or ``tensor`` itself."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def prompt(vocab: int, tokens: int, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234)
    return torch.randint(3, vocab, (1, tokens), generator=gen).to(device)


def probe(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> dict:
    """The prompt's last-token logits (fp32, CPU) and ``new_tokens`` greedy tokens."""
    with torch.no_grad():
        logits = whole(model(ids, logits_to_keep=1).logits)[0, -1].float().cpu()
        tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return {"logits": logits, "tokens": tokens[0, ids.shape[1]:].cpu()}


class StepClock(transformers.LogitsProcessor):
    """Records when each generation step's logits are ready (the device synchronised first)."""

    def __init__(self, device: str) -> None:
        self.device, self.times = device, []

    def __call__(self, input_ids, scores):
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return scores


def timed_run(model, ids: torch.Tensor, new_tokens: int, device: str) -> dict:
    """One greedy ``generate``: ok, prefill seconds, decode tokens/s (median step), this rank's peak GiB."""
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    clock = StepClock(device)
    start = time.perf_counter()
    try:
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                           logits_processor=transformers.LogitsProcessorList([clock]))
        ok, error = True, None
    except torch.OutOfMemoryError as oom:
        ok, error = False, str(oom).splitlines()[0][:200]
    steps = sorted(b - a for a, b in zip(clock.times, clock.times[1:]))
    return {"ok": ok, "error": error,
            "prefill_s": round(clock.times[0] - start, 2) if clock.times else None,
            "decode_tok_s": round(1.0 / steps[len(steps) // 2], 2) if steps else None,
            "peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 2) if device == "cuda" else None}


def gather(value):
    """``value`` of every rank, in rank order (``[value]`` outside ``torchrun``)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def init_distributed(device: str) -> None:
    """Under ``torchrun``: this rank's device, and the process group (NCCL on GPUs, gloo on the CPU) started
    here rather than inside ``from_pretrained``, so rank 0 can write a checkpoint while the others wait."""
    import torch.distributed as dist

    if world_size() <= 1 or dist.is_initialized():
        return
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def info(args, device: str) -> dict:
    return {"shape": args.shape, "layers": args.layers or BENCH_SHAPES[args.shape]["num_hidden_layers"],
            "pretraining_length": args.pretraining_length, "world": world_size(),
            "device": torch.cuda.get_device_name() if device == "cuda" else platform.machine() + " CPU",
            "torch": str(torch.__version__), "transformers": transformers.__version__}


def row_key(row: dict) -> tuple:
    return tuple(row.get(k) for k in ("phase", "shape", "layers", "world", "T", "kv_dtype", "model", "device"))


#: per phase: the section title, then (column, cell of a row) pairs of its table in ``tp.md``
SECTIONS = {
    "reference": ("Correctness: the tensor-parallel run vs one process on one device (same checkpoint)", [
        ("shape", lambda r: r["shape"]), ("layers", lambda r: r["layers"]), ("world", lambda r: r["parallel_world"]),
        ("prompt", lambda r: r["T"]), ("device", lambda r: r["device"]),
        ("max abs logit diff", lambda r: f"{r['max_abs_logit_diff']:.4g}"),
        ("logit scale", lambda r: f"{r['logit_scale']:.3g}"), ("same top-1", lambda r: r["same_top1"]),
        ("same greedy tokens", lambda r: r["same_tokens"]), ("first differing step", lambda r: r["first_differing_step"]),
    ]),
    "longest": ("Long prompts: one generate call, DCA, prefill in pieces", [
        ("shape", lambda r: r["shape"]), ("layers", lambda r: r["layers"]), ("world", lambda r: r["world"]),
        ("KV cache", lambda r: r["kv_dtype"]), ("T", lambda r: r["T"]), ("ok", lambda r: r["ok"]),
        ("prefill s", lambda r: r["prefill_s"]), ("decode tok/s", lambda r: r["decode_tok_s"]),
        ("peak GiB per GPU", lambda r: " / ".join(str(p) for p in r["peak_gib_per_rank"])),
        ("planned GiB per GPU", lambda r: r["planned_gib"]), ("device", lambda r: r["device"]),
    ]),
    "throughput": ("Prefill throughput, DCA vs the unpatched model (SDPA), same TP setup", [
        ("shape", lambda r: r["shape"]), ("layers", lambda r: r["layers"]), ("world", lambda r: r["world"]),
        ("T", lambda r: r["T"]), ("model", lambda r: r["model"]), ("best prefill s", lambda r: r["seconds"]),
        ("tokens/s", lambda r: r["tokens_per_s"]), ("DCA / unpatched", lambda r: r.get("dca_over_unpatched", "—")),
        ("device", lambda r: r["device"]),
    ]),
}


def save_rows(out: Path, rows: list[dict]) -> None:
    """Merge ``rows`` into ``out/tp.json`` (a row replaces an earlier one with the same settings) and rewrite ``tp.md``."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "tp.json"
    merged = merge_rows(json.loads(path.read_text()) if path.exists() else [], rows, row_key)
    path.write_text(json.dumps(merged, indent=1) + "\n")
    lines = ["# Tensor-parallel DCA (`torchrun`, `tp_plan=\"auto\"`)", "",
             "Rows of every run (`tp.json`); reproduce with `bench/bench_tp.py --phase <phase>` (module docstring)."]
    for phase, (title, columns) in SECTIONS.items():
        found = [r for r in merged if r["phase"] == phase]
        if found:
            lines += ["", f"## {title}", "", "| " + " | ".join(c for c, _ in columns) + " |",
                      "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(str(cell(r)) for _, cell in columns) + " |" for r in found]
    (out / "tp.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", required=True, choices=["correctness", "reference", "longest", "throughput"])
    parser.add_argument("--shape", default="llama-3-70b", choices=sorted(BENCH_SHAPES))
    parser.add_argument("--layers", type=int, default=None,
                        help="layers (default: 2 for correctness/reference, the shape's depth otherwise)")
    parser.add_argument("--pretraining-length", type=int, default=8192)
    parser.add_argument("--prompt-tokens", type=int, default=12288, help="correctness/reference prompt")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--lengths", nargs="+", default=["256k"], help="longest: prompt lengths")
    parser.add_argument("--length", default="32k", help="throughput: prompt length")
    parser.add_argument("--kv-dtype", default="bf16", choices=["bf16", "fp8"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/chunkllama_tp"), help="checkpoints and the probe")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--smoke", action="store_true", help="the CPU: " + ", ".join(f"{k}={v}" for k, v in SMOKE.items()))
    args = parser.parse_args()
    apply_smoke(parser, args, SMOKE, args.work / "results")
    if args.phase in ("correctness", "reference") and args.layers is None:
        args.layers = 2
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    init_distributed(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = shape_config(args.shape, args.layers)
    check_heads_split(config, world_size())  # a clear error before any rank loads
    dca = chunkllama.DCAConfig(args.pretraining_length)
    common = info(args, device)
    rows: list[dict] = []

    if args.phase in ("correctness", "reference"):
        checkpoint = args.work / f"{args.shape}-{args.layers}-layers"
        if is_main_process() and not (checkpoint / "config.json").exists():
            write_random_checkpoint(checkpoint, config, dtype)
        barrier()
        model = load(checkpoint, device, dtype)
        chunkllama.apply_dca(model, dca)
        result = probe(model, prompt(config.vocab_size, args.prompt_tokens, device), args.new_tokens)
        probe_file = args.work / f"probe-{args.shape}-{args.layers}-world{world_size()}.pt"
        if args.phase == "correctness":
            if is_main_process():
                torch.save({**result, **common}, probe_file)
                print(f"saved {probe_file}: top-1 {int(result['logits'].argmax())}, tokens {result['tokens'].tolist()}")
        else:
            found = sorted(args.work.glob(f"probe-{args.shape}-{args.layers}-world*.pt"))
            parallel = [torch.load(p) for p in found if not p.name.endswith("world1.pt")]
            if not parallel:
                raise SystemExit(f"no tensor-parallel probe in {args.work}: run the correctness phase under torchrun first.")
            for other in parallel:
                diff = (other["logits"] - result["logits"]).abs()
                differ = (other["tokens"] != result["tokens"]).nonzero()
                rows.append({"phase": "reference", "T": args.prompt_tokens, **common, "parallel_world": other["world"],
                             "max_abs_logit_diff": float(diff.max()), "logit_scale": float(result["logits"].abs().max()),
                             "same_top1": int(other["logits"].argmax()) == int(result["logits"].argmax()),
                             "same_tokens": bool(torch.equal(other["tokens"], result["tokens"])),
                             "first_differing_step": int(differ[0, 0]) if len(differ) else None,
                             "parallel_device": other["device"]})
                print(json.dumps(rows[-1]))
    else:
        checkpoint = args.work / f"{args.shape}-{config.num_hidden_layers}-layers-sparse"
        if is_main_process() and not (checkpoint / "config.json").exists():
            size = write_sparse_checkpoint(checkpoint, config, torch.bfloat16)
            print(f"sparse checkpoint {checkpoint}: {size / GIB:.1f} GiB apparent", flush=True)
        barrier()
        model = load(checkpoint, device, dtype)
        fill_random(model)
        shape = dataclasses.replace(Shape.from_config(BENCH_SHAPES[args.shape]), layers=config.num_hidden_layers)
        if args.phase == "longest":
            chunkllama.apply_dca(model, dca, kv_cache_dtype="fp8" if args.kv_dtype == "fp8" else "auto")
            piece = resolve_prefill_chunk_size(dca, None)
            enable_chunked_prefill(model, piece)
            timed_run(model, prompt(config.vocab_size, 2 * piece + 17, device), 2, device)  # compile the kernels
            for text in args.lengths:
                length = parse_size(text, what="length")
                result = timed_run(model, prompt(config.vocab_size, length, device), args.new_tokens, device)
                peaks = gather(result["peak_gib"])
                model_dtype = "bf16" if device == "cuda" else "fp32"
                kv_dtype = "fp8" if args.kv_dtype == "fp8" else model_dtype
                plan = make_plan(shape, length=length, new_tokens=args.new_tokens, dtype=model_dtype, kv_dtype=kv_dtype,
                                 gpus=world_size(), prefill_chunk=piece, dca=dca, reserve=0)
                rows.append({"phase": "longest", "T": length, "kv_dtype": kv_dtype, **common, **result,
                             "ok": all(gather(result["ok"])), "peak_gib_per_rank": peaks, "prefill_chunk": piece,
                             "planned_gib": round(plan.total(True) / GIB, 3)})
                if is_main_process():
                    print(json.dumps(rows[-1]), flush=True)
        else:
            length = parse_size(args.length, what="length")
            ids = prompt(config.vocab_size, length, device)
            seconds: dict[str, list[float]] = {"unpatched": [], "dca": []}
            for _ in range(2):  # alternating, best of two each
                for name in ("unpatched", "dca"):
                    if name == "dca":
                        chunkllama.apply_dca(model, dca)
                    result = timed_run(model, ids, 1, device)
                    if name == "dca":
                        chunkllama.remove_dca(model)
                    seconds[name].append(result["prefill_s"] if result["ok"] else float("inf"))
            best = {name: min(values) for name, values in seconds.items()}
            for name in ("unpatched", "dca"):
                rows.append({"phase": "throughput", "T": length, "model": name, **common, "seconds": best[name],
                             "all_seconds": seconds[name], "tokens_per_s": round(length / best[name], 1),
                             **({"dca_over_unpatched": round(best["unpatched"] / best["dca"], 3)} if name == "dca" else {})})
    if is_main_process() and rows:
        save_rows(args.out, rows)
        print((args.out / "tp.md").read_text())
    barrier()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
