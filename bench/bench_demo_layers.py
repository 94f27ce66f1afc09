"""What the demo costs on an idle CPU, measured on a busy one: single-thread CPU seconds per phase.

On a shared machine wall time says little and multi-threaded CPU time is inflated by threads
spinning while their partner waits for a core. One thread's CPU time is what the work costs; on
an idle machine with T cores the phase takes about that divided by T (less than perfectly).

Runs the demo's two phases (plain RoPE over the whole prompt in one pass; DCA continuing from the
shared first chunk, one DCA chunk per forward, set up as the demo sets it up for the default
model) on the first ``--layers`` decoder layers of the default model (each layer costs the
same), and scales to the full depth. ``python bench/bench_demo_layers.py [--layers 2] [--dtype bfloat16]``
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from chunkllama import apply_dca, get_dca_config, load_model, remove_dca
    from chunkllama.demo import DEFAULT_MODEL_DCA_WINDOW, _keep_first
    from chunkllama.eval import passkey as pk

    model, tokenizer = load_model(dtype=args.dtype, device="cpu")
    depth = len(model.model.layers)
    model.model.layers = model.model.layers[: args.layers]
    apply_dca(model, DEFAULT_MODEL_DCA_WINDOW)
    config = get_dca_config(model)
    remove_dca(model)
    prompt = pk.make_passkey_prompt(tokenizer, args.length, exact=True)
    shared = config.chunk_len
    cpu, wall = {}, {}

    tick, wall_tick = time.process_time(), time.perf_counter()
    _, cache = pk.prefill(model, prompt.input_ids)
    cpu["plain"], wall["plain"] = time.process_time() - tick, time.perf_counter() - wall_tick
    _keep_first(cache, shared)
    apply_dca(model, config)
    tick, wall_tick = time.process_time(), time.perf_counter()
    pk.prefill(model, prompt.input_ids, cache=cache, chunk=config.chunk_len)
    cpu["dca"], wall["dca"] = time.process_time() - tick, time.perf_counter() - wall_tick
    remove_dca(model)
    scale = depth / args.layers
    result = {
        "tokens": len(prompt.input_ids), "dtype": args.dtype, "layers_run": args.layers, "model_layers": depth,
        "cpu_s_one_thread_measured": cpu, "wall_s_measured": wall,
        "cpu_s_one_thread_full_model": {k: round(v * scale, 1) for k, v in cpu.items()},
        "cpu_s_one_thread_full_model_total": round(sum(cpu.values()) * scale, 1),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
