"""Where DCA's attention goes: which chunk relation holds a needle, and the mass per relation.

A study tool for issue 14 (why retrieval fails at 4-8x the window). For a prompt and a span of
needle tokens it reports

- the chunk relation (intra / successive / inter, :mod:`chunkllama.positions`) between the query
  rows looked at (default: the last prompt token, the one that produces the first answer token)
  and the needle's keys;
- per layer, the attention probability mass those query rows put on intra-, successive- and
  inter-chunk keys and on the needle's keys (averaged over heads and rows; the largest head too).

The weights are computed densely from the op's own inputs (the unrotated queries, the cached keys
rotated at ``p % chunk_len``, the positions, the model's rotary frequencies and the DCA config,
exactly as :func:`chunkllama.attention.dca_attention` receives them), but only for the chosen
query rows, so a 64k prompt costs ``rows x 64k`` scores per head and layer. The recorder wraps the
op for the duration of one forward pass (:func:`recording_dca_inputs`); nothing else changes.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator, Sequence
from unittest import mock

import torch

from ..config import DCAConfig
from ..positions import INTER, INTRA, RELATION_NAMES, SUCCESSIVE, chunk_relation, query_rope_positions
from ..rope import RotaryParams, apply_rope


def dca_attention_weights(
    query: torch.Tensor,
    key: torch.Tensor,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    rope: RotaryParams,
    config: DCAConfig,
    scale: float | None = None,
    rows: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DCA attention probabilities of some query rows, densely, from the op's inputs.

    Args:
        query: ``(B, Hq, Tq, D)``, not rotated (as :func:`chunkllama.attention.dca_attention` takes it).
        key: ``(B, Hk, Tk, D)``, rotated at ``key_positions % config.chunk_len`` (as cached).
        query_positions, key_positions: int64 ``(B, Tq)`` / ``(B, Tk)``; negative = padding.
        rope: the model's rotary frequencies and attention scaling.
        config: the DCA lengths.
        scale: softmax scale; default ``D ** -0.5``.
        rows: query indices (into ``Tq``) to compute; default: all.
    Returns:
        ``(probs, relations)``: fp32 ``(B, Hq, R, Tk)`` softmax weights (rows that see no key are 0)
        and int8 ``(B, R, Tk)`` relation codes (:data:`chunkllama.positions.RELATION_NAMES`).
    """
    batch, q_heads, q_len, head_dim = query.shape
    rows = list(range(q_len)) if rows is None else [r % q_len for r in rows]
    index = torch.as_tensor(rows, dtype=torch.long, device=query.device)
    q = query.index_select(2, index).float()
    q_pos = query_positions.index_select(1, index).to(torch.int64)
    scale = head_dim**-0.5 if scale is None else scale
    groups = q_heads // key.shape[1]
    k = key.float().repeat_interleave(groups, dim=1)
    relations = chunk_relation(q_pos[:, :, None], key_positions.to(torch.int64)[:, None, :], config.chunk_len)
    scores = torch.full((batch, q_heads, len(rows), key.shape[2]), float("-inf"), device=query.device)
    for code, positions in zip((INTRA, SUCCESSIVE, INTER),
                               query_rope_positions(q_pos.clamp(min=0), config.chunk_len, config.chunk_size)):
        rotated = apply_rope(q, rope, positions)
        part = torch.matmul(rotated, k.transpose(-1, -2)) * scale
        scores = torch.where((relations == code)[:, None], part, scores)
    probs = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)
    return probs, relations


@dataclasses.dataclass(frozen=True)
class LayerMass:
    """Attention mass of the looked-at query rows in one layer (fractions of 1, mean over heads and rows).

    Attributes:
        layer: call order of the attention op in the forward pass (= layer index).
        intra, successive, inter: mass on keys of each relation (they sum to 1).
        needle: mass on the needle's keys (0 when no needle span was given).
        needle_max_head: the largest per-head needle mass (mean over rows).
    """

    layer: int
    intra: float
    successive: float
    inter: float
    needle: float = 0.0
    needle_max_head: float = 0.0


def layer_mass(layer: int, probs: torch.Tensor, relations: torch.Tensor,
               needle: tuple[int, int] | None = None) -> LayerMass:
    """Summarise ``(probs, relations)`` of :func:`dca_attention_weights` (batch row 0)."""
    p = probs[0]  # (H, R, Tk)
    rel = relations[0]  # (R, Tk)
    mass = {code: float((p * (rel == code)).sum(-1).mean()) for code in (INTRA, SUCCESSIVE, INTER)}
    needle_mass = needle_max = 0.0
    if needle is not None:
        per_head = p[:, :, needle[0] : needle[1]].sum(-1).mean(-1)  # (H,)
        needle_mass, needle_max = float(per_head.mean()), float(per_head.max())
    return LayerMass(layer, mass[INTRA], mass[SUCCESSIVE], mass[INTER], needle_mass, needle_max)


@contextlib.contextmanager
def recording_dca_inputs(model: Any, on_call: Any) -> Iterator[None]:
    """While active, every DCA op call of ``model``'s patched layers also calls ``on_call(inputs)``.

    ``inputs`` is a dict with the op's arguments (``query``, ``key``, ``value``,
    ``query_positions``, ``key_positions``, ``rope``, ``config``, ``scale``). The op itself runs
    unchanged. The wrapper replaces the op where the patched forward looks it up
    (:mod:`chunkllama.patching`) and is removed on exit; it is not thread-safe.

    Raises:
        ValueError: DCA is not applied to ``model``.
    """
    from .. import patching

    if patching.get_dca_config(model) is None:
        raise ValueError("DCA is not applied to this model; call chunkllama.apply_dca(model) first.")
    original = patching.dca_attention

    def wrapper(query, key, value, query_positions, key_positions, rope, config, scale=None, backend="auto"):
        on_call({"query": query, "key": key, "value": value, "query_positions": query_positions,
                 "key_positions": key_positions, "rope": rope, "config": config, "scale": scale})
        return original(query, key, value, query_positions, key_positions, rope, config, scale=scale, backend=backend)

    with mock.patch.object(patching, "dca_attention", wrapper):
        yield


@dataclasses.dataclass(frozen=True)
class ProbeReport:
    """What :func:`probe_attention` found for one prompt.

    Attributes:
        n_tokens: prompt length.
        rows: the query rows looked at (indices into the prompt).
        needle: ``(start, end)`` token span of the needle, or None.
        needle_relation: relation of the needle's first key to each looked-at row ("intra",
            "successive", "inter"), or () without a needle.
        chunk_len, chunk_size: the DCA config used.
        layers: one :class:`LayerMass` per layer.
    """

    n_tokens: int
    rows: tuple[int, ...]
    needle: tuple[int, int] | None
    needle_relation: tuple[str, ...]
    chunk_len: int
    chunk_size: int
    layers: tuple[LayerMass, ...]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@torch.inference_mode()
def probe_attention(
    model: Any,
    input_ids: Sequence[int] | torch.Tensor,
    needle: tuple[int, int] | None = None,
    rows: Sequence[int] = (-1,),
) -> ProbeReport:
    """Run ``model`` (with DCA applied) on ``input_ids`` once and report where attention goes.

    Args:
        model: a causal LM patched with :func:`chunkllama.apply_dca`.
        input_ids: one prompt, ``(T,)`` or ``(1, T)``.
        needle: ``(start, end)`` token indices of the needle (e.g. from
            :attr:`chunkllama.eval.ruler_tasks.RulerSample.needle_tokens`), or None.
        rows: query rows to look at; default: the last token.

    Raises:
        ValueError: DCA is not applied, or the needle span is outside the prompt.
    """
    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(1, -1)
    n_tokens = ids.shape[1]
    if needle is not None and not 0 <= needle[0] < needle[1] <= n_tokens:
        raise ValueError(f"needle span {needle} is not inside the prompt of {n_tokens} tokens.")
    rows = tuple(r % n_tokens for r in rows)
    layers: list[LayerMass] = []
    configs: list[DCAConfig] = []

    def on_call(inputs: dict[str, Any]) -> None:
        probs, relations = dca_attention_weights(
            inputs["query"], inputs["key"], inputs["query_positions"], inputs["key_positions"], inputs["rope"],
            inputs["config"], inputs["scale"], rows,
        )
        layers.append(layer_mass(len(layers), probs, relations, needle))
        configs.append(inputs["config"])

    device = next(model.parameters()).device
    base = getattr(model, "base_model", None) or model  # hidden states only: no logits over the vocabulary
    with recording_dca_inputs(model, on_call):
        base(input_ids=ids.to(device), use_cache=False)
    config = configs[0]
    relation = ()
    if needle is not None:
        codes = chunk_relation(torch.tensor(rows)[:, None], torch.tensor([needle[0]])[None, :], config.chunk_len)
        relation = tuple(RELATION_NAMES[int(c)] for c in codes[:, 0])
    return ProbeReport(n_tokens, rows, needle, relation, config.chunk_len, int(config.chunk_size), tuple(layers))


__all__ = ["LayerMass", "ProbeReport", "dca_attention_weights", "layer_mass", "probe_attention",
           "recording_dca_inputs"]
