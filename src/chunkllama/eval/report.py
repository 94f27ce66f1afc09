"""Result files of every task: ``summary.json``, per-sample JSONL, a markdown table, plots.

Layout of ``--output DIR``:
    summary.json        {"task", "environment", "settings", "rows": [...]}
    samples.jsonl       one JSON object per scored sample (window, trial, question)
    table.md            markdown table of the rows (methods x lengths, or tasks x methods)
    <task>_vs_length.png   score against length, one line per method (ppl, passkey)
"""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence


def environment() -> dict[str, Any]:
    """Versions and device, written into every result file."""
    import torch
    import transformers

    import chunkllama

    device = "cpu"
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        device = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {
        "device": device,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "chunkllama": getattr(chunkllama, "__version__", "?"),
        "python": platform.python_version(),
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None if math.isnan(value) else (1e308 if value > 0 else -1e308)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def write_jsonl(path: str | Path, records: Iterable[Mapping[str, Any]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(_jsonable(record), ensure_ascii=False) + "\n")
    return path


def write_json(path: str | Path, data: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(data), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:.0f}"
        return f"{value:.2f}"
    return str(value)


def pivot_table(
    rows: Sequence[Mapping[str, Any]], value: str | Any, row_key: str = "method", col_key: str = "L",
    col_format: Any = None,
) -> str:
    """Markdown table with one line per ``row_key`` and one column per ``col_key``.

    ``value`` is a row field name or a function ``row -> str``.
    """
    row_ids = list(dict.fromkeys(r[row_key] for r in rows))
    col_ids = list(dict.fromkeys(r[col_key] for r in rows))
    fmt_col = col_format or (lambda c: f"{c // 1024}k" if isinstance(c, int) and c % 1024 == 0 else str(c))
    cell: dict[tuple[Any, Any], str] = {}
    for r in rows:
        cell[(r[row_key], r[col_key])] = value(r) if callable(value) else _fmt(r.get(value))
    lines = [
        f"| {row_key} | " + " | ".join(fmt_col(c) for c in col_ids) + " |",
        "|---|" + "---|" * len(col_ids),
    ]
    for rid in row_ids:
        lines.append(f"| {rid} | " + " | ".join(cell.get((rid, c), "–") for c in col_ids) + " |")
    return "\n".join(lines) + "\n"


def plot_vs_length(
    rows: Sequence[Mapping[str, Any]], value: str, path: str | Path, title: str, ylabel: str, log_y: bool = False
) -> Path:
    """Score against length, one line per method (log2 x axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted((r["L"], r[value]) for r in rows if r["method"] == method and r.get(value) is not None)
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
    ax.set_xscale("log", base=2)
    lengths = sorted({r["L"] for r in rows})
    ax.set_xticks(lengths)
    ax.set_xticklabels([f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths])
    values = [r[value] for r in rows if r.get(value) is not None and r[value] > 0]
    if log_y and values and max(values) / min(values) > 10:  # log only when it helps readability
        from matplotlib.ticker import FuncFormatter, NullFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(
    output: str | Path,
    task: str,
    rows: Sequence[Mapping[str, Any]],
    samples: Sequence[Mapping[str, Any]],
    table_md: str,
    settings: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``summary.json``, ``samples.jsonl`` and ``table.md`` under ``output``."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"task": task, "environment": environment(), "settings": dict(settings or {}), "rows": list(rows)}
    paths = {
        "summary": write_json(out / "summary.json", summary),
        "samples": write_jsonl(out / "samples.jsonl", samples),
    }
    (out / "table.md").write_text(table_md, encoding="utf-8")
    paths["table"] = out / "table.md"
    return paths
