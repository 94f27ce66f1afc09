"""A batched generation engine for the server: a request queue and one worker thread that steps
every active sequence together on the device (iteration-level, "continuous" batching).

How a step works (all on the worker thread; the model is only ever touched there):

1. **Admit**: waiting requests move to *prefilling* while ``active + prefilling < max_batch``.
2. **Prefill one piece**: the oldest prefilling sequence feeds its next ``prefill_chunk`` prompt
   tokens into its own single-row ``DynamicCache`` (chunked prefill: activation memory bounded by
   the piece, and running sequences keep decoding between pieces of a long document). Its first
   tokens come from the :class:`PrefixCache` when a stored sequence shares a prefix with it.
   Short prompts with nothing cached that arrive together are read in one left-padded forward
   (up to ``prefill_chunk`` padded tokens). When a prompt is done, its first token is sampled and
   the sequence joins the batch.
3. **Decode**: one forward of ``(B, 1)`` tokens over the batch cache.

The batch cache is one ``DynamicCache`` whose rows are **left-padded** to the longest row: row
``i`` with ``L_i`` cached tokens sits at indices ``L_max - L_i ..``, its token at index ``j`` has
position id ``j - (L_max - L_i)``. The DCA attention reads each row's padding from
``position_ids`` (keys left of a row's first real token get negative positions and are masked),
so no attention mask is passed. The cache is rebuilt only when membership changes (a sequence
joins or leaves): rows are sliced out of the old tensors and re-padded. Between changes every
row grows by one token per step, so the padding stays aligned.

Requires a model with DCA applied (``apply_dca``): plain HF attention would need a mask for the
padded rows. The engine never writes a module-level global; all state is on the instance.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import threading
import time
from typing import Any, Callable, Sequence

import torch
from transformers import DynamicCache

from ..patching import get_dca_config
from .prefix_cache import LayerKV, PrefixCache
from .sampling import SamplingParams, TextStream, next_tokens

log = logging.getLogger("chunkllama.serve")



# --- events sent to a request's callback (from the worker thread) -----------------------------


@dataclasses.dataclass(frozen=True)
class Progress:
    """Prompt tokens read so far (``done`` counts tokens served from the prefix cache too)."""

    done: int
    total: int


@dataclasses.dataclass(frozen=True)
class Delta:
    """New printable text (may be ``""`` when a token only completes part of a character)."""

    text: str


@dataclasses.dataclass(frozen=True)
class Finished:
    """The answer ended. ``finish_reason``: ``"stop"`` | ``"length"`` | ``"abort"``."""

    finish_reason: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    queue_s: float
    prefill_s: float
    decode_s: float
    token_ids: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Failed:
    """The engine could not serve the request (e.g. out of memory); ``message`` says why."""

    message: str


Event = Progress | Delta | Finished | Failed


class QueueFull(RuntimeError):
    """Too many requests are waiting; retry later (HTTP 429)."""


class ContextTooLong(ValueError):
    """The prompt does not fit the engine's ``max_context`` (HTTP 400)."""

    def __init__(self, prompt_tokens: int, max_context: int) -> None:
        super().__init__(
            f"This prompt has {prompt_tokens} tokens, but the server's maximum context is {max_context} tokens "
            f"(prompt + answer, at least 1 answer token). Shorten the prompt or document, or restart the "
            f"server with a larger --max-context."
        )
        self.prompt_tokens, self.max_context = prompt_tokens, max_context


class EngineStopped(RuntimeError):
    """The engine is shutting down, or stopped after a fatal error, and takes no new requests (HTTP 503)."""


def _device_lost(exc: BaseException) -> bool:
    """Whether ``exc`` leaves the device unusable for every later step (an illegal memory access, a
    device-side assert): CUDA reports such errors again on every call, so serving cannot go on."""
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    text = str(exc)
    return any(s in text for s in ("illegal memory access", "device-side assert", "unspecified launch failure"))


# --- sequences -----------------------------------------------------------------------------------


class RequestHandle:
    """What :meth:`BatchedEngine.submit` returns: an id and a way to cancel (thread-safe)."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Stop generating for this request (e.g. the client went away); its slot is freed at the next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


@dataclasses.dataclass(eq=False)  # compared by identity
class _Sequence:
    handle: RequestHandle
    prompt: list[int]
    params: SamplingParams
    max_new: int
    stream: TextStream
    on_event: Callable[[Event], None]
    generator: torch.Generator | None
    submitted: float
    tokens: list[int] = dataclasses.field(default_factory=list)  # prompt + generated (last one not yet fed)
    cache: Any = None  # single-row DynamicCache while prefilling
    fed: int = 0  # prompt tokens in the cache (prefill progress)
    cached_tokens: int = 0  # of which served by the prefix cache
    generated: int = 0
    started: float | None = None  # prefill start
    first_token: float | None = None

    @property
    def cache_len(self) -> int:
        return len(self.tokens) - 1  # every token but the last sampled one has keys/values


# --- the engine ----------------------------------------------------------------------------------


@dataclasses.dataclass
class _Stats:
    requests: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    decode_steps: int = 0
    decode_rows: int = 0
    busy_s: float = 0.0


class BatchedEngine:
    """Serve many generation requests at once on one DCA-patched model.

    Args:
        model: a causal LM with DCA applied (``chunkllama.apply_dca``), in eval mode, on its device.
        tokenizer: its tokenizer (decoding for :class:`TextStream`).
        max_batch: sequences generating (or prefilling) at once.
        max_queue: requests waiting for a slot beyond that; one more raises :class:`QueueFull`.
        max_context: most tokens per sequence (prompt + answer); longer prompts raise
            :class:`ContextTooLong` and answers stop at it with finish reason ``"length"``.
        prefill_chunk: prompt tokens per prefill forward (bounds activation memory and the pause
            running streams see while a long document is read).
        prefix_cache_bytes: memory budget of the :class:`PrefixCache` (0 disables it).
        eos_token_ids: tokens that end an answer; default: the tokenizer's / generation config's EOS.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        max_context: int | None = None,
        prefill_chunk: int = 1024,
        prefix_cache_bytes: int = 2 << 30,
        eos_token_ids: Sequence[int] | None = None,
    ) -> None:
        if get_dca_config(model) is None:
            raise ValueError("BatchedEngine needs a model with DCA applied: call chunkllama.apply_dca(model) first "
                             "(batched rows are left-padded and DCA reads the padding from position_ids).")
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1:
            raise ValueError(f"need max_batch >= 1, max_queue >= 0, prefill_chunk >= 1; got {max_batch}, "
                             f"{max_queue}, {prefill_chunk}")
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.max_context = int(max_context or 8 * get_dca_config(model).pretraining_length)
        self.eos_token_ids = frozenset(eos_token_ids if eos_token_ids is not None else _default_eos(model, tokenizer))
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._prefilling: list[_Sequence] = []
        self._active: list[_Sequence] = []  # rows of the batch cache, in order
        self._batch_cache: Any = None
        self._batch_rows: list[_Sequence] = []  # membership the batch cache was built for
        self._stats = _Stats()
        self._started_at = time.monotonic()
        self._recent: collections.deque[tuple[float, int]] = collections.deque(maxlen=256)  # (time, tokens) per step
        self._stopping = False
        self._failure: str | None = None
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None

    # --- public API (any thread) -----------------------------------------------------------

    @property
    def failure(self) -> str | None:
        """Why the engine stopped serving (an error that left the device unusable), or None while it serves."""
        with self._lock:
            return self._failure

    def start(self) -> BatchedEngine:
        """Start the worker thread (idempotent); returns self."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="chunkllama-engine", daemon=True)
                self._thread.start()
        return self

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, on_event: Callable[[Event], None],
               request_id: str | None = None) -> RequestHandle:
        """Queue one request; ``on_event`` is called from the worker thread with each :data:`Event`.

        Raises:
            ContextTooLong: ``len(prompt_ids) >= max_context``.
            QueueFull: ``max_queue`` requests are already waiting.
            EngineStopped: :meth:`stop` was called, or the engine stopped after a fatal error.
        """
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("the prompt is empty: send at least one token")
        if len(prompt) >= self.max_context:
            raise ContextTooLong(len(prompt), self.max_context)
        handle = RequestHandle(request_id or f"req-{next(self._ids)}")
        seq = _Sequence(
            handle=handle, prompt=prompt, params=params,
            max_new=min(params.max_new_tokens, self.max_context - len(prompt)),
            stream=TextStream(self.tokenizer, stop=params.stop, eos_token_ids=self.eos_token_ids),
            on_event=on_event, generator=params.make_generator(self.device), submitted=time.monotonic(),
            tokens=list(prompt),
        )
        with self._lock:
            if self._failure is not None:
                raise EngineStopped(f"the engine stopped after a fatal error ({self._failure}); restart the server")
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            free_slots = max(0, self.max_batch - len(self._active) - len(self._prefilling))
            if len(self._waiting) >= self.max_queue + free_slots:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (--max-queue {self.max_queue}); "
                                "retry later")
            self._waiting.append(seq)
            self._stats.requests += 1
            self._wake.notify()
        return handle

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking requests, let running answers finish for up to ``timeout`` s, abort the rest, join."""
        with self._lock:
            self._stopping = True
            self._wake.notify()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.busy():
            time.sleep(0.02)
        with self._lock:
            for seq in [*self._waiting, *self._prefilling, *self._active]:
                seq.handle.cancel()
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=max(1.0, timeout))

    def busy(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._prefilling or self._active)

    def metrics(self) -> dict[str, Any]:
        """A summary: requests, tokens, queue depth, batch size, recent decode tokens/s, prefix cache."""
        with self._lock:
            stats = dataclasses.asdict(self._stats)
            recent = list(self._recent)
            stats.update(
                queue_depth=len(self._waiting), prefilling=len(self._prefilling), active=len(self._active),
                max_batch=self.max_batch, max_queue=self.max_queue, max_context=self.max_context,
                uptime_s=round(time.monotonic() - self._started_at, 3),
            )
        window = [(t, n) for t, n in recent if t >= time.monotonic() - 10.0]
        span = (window[-1][0] - window[0][0]) if len(window) > 1 else 0.0
        stats["decode_tokens_per_s_10s"] = round(sum(n for _, n in window[1:]) / span, 2) if span > 0 else 0.0
        stats["mean_batch"] = round(stats["decode_rows"] / stats["decode_steps"], 3) if stats["decode_steps"] else 0.0
        stats["prefix_cache"] = {"entries": len(self.prefix_cache), "bytes": self.prefix_cache.nbytes,
                                 "budget_bytes": self.prefix_cache.budget_bytes, "hits": self.prefix_cache.hits,
                                 "hit_tokens": self.prefix_cache.hit_tokens}
        stats["busy_s"] = round(stats["busy_s"], 3)
        return stats

    # --- worker -----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._serve_loop()
        except BaseException as exc:  # noqa: BLE001 - whatever ends the loop must not leave clients waiting
            self._fail_all(exc)

    def _fail_all(self, exc: BaseException) -> None:
        """The worker cannot go on: fail every request (they get a :class:`Failed` event) and refuse new ones."""
        log.error("engine stopped after a fatal error", exc_info=exc)
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        with self._lock:
            self._failure, self._stopping = reason, True
            seqs = [*self._waiting, *self._prefilling, *self._active]
        self._fail(seqs, f"the engine stopped after a fatal error ({reason}); restart the server")

    def _fail(self, seqs: list[_Sequence], message: str) -> None:
        """Remove ``seqs`` (dropping the batch cache if it holds any of them) and send each a :class:`Failed`."""
        with self._lock:
            if any(seq in self._batch_rows for seq in seqs):  # the batch cache is suspect
                self._batch_cache, self._batch_rows = None, []
            for seq in seqs:
                self._remove(seq)
                self._stats.failed += 1
        for seq in seqs:
            _emit(seq, Failed(message))

    def _serve_loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._lock:
                    self._drop_cancelled()
                    while self._waiting and len(self._active) + len(self._prefilling) < self.max_batch:
                        seq = self._waiting.popleft()
                        seq.started = time.monotonic()
                        self._prefilling.append(seq)
                    if self._stopping and not (self._waiting or self._prefilling or self._active):
                        return
                    if not (self._prefilling or self._active):
                        self._wake.wait(timeout=0.5)
                        continue
                    pending = list(self._prefilling)
                tick = time.monotonic()
                if pending:
                    group = self._prefill_group(pending)
                    if group:
                        self._guarded(group, self._prefill, group)
                with self._lock:
                    rows = list(self._active)
                if rows:
                    self._guarded(rows, self._decode_step, rows)
                with self._lock:
                    self._stats.busy_s += time.monotonic() - tick

    def _guarded(self, seqs: list[_Sequence], step: Callable[[Any], None], arg: Any) -> None:
        """Run one step; on an exception fail exactly the sequences involved and keep serving, unless the
        error left the device unusable: then it propagates and stops the engine."""
        try:
            step(arg)
        except Exception as exc:  # noqa: BLE001 - one bad step must not take the server down
            if _device_lost(exc):
                raise
            log.exception("engine step failed for %s", [s.handle.request_id for s in seqs])
            self._fail(seqs, f"{type(exc).__name__}: {exc}")

    def _drop_cancelled(self) -> None:
        """(lock held) Remove cancelled sequences wherever they are; they get a final ``abort`` event."""
        for seq in [s for s in [*self._waiting, *self._prefilling, *self._active] if s.handle.cancelled]:
            self._remove(seq)
            self._stats.cancelled += 1
            seq.stream.finish("abort")
            _emit(seq, self._finished_event(seq, "abort"))

    def _remove(self, seq: _Sequence) -> None:
        for group in (self._prefilling, self._active):
            if seq in group:
                group.remove(seq)
        if seq in self._waiting:
            self._waiting.remove(seq)
        seq.cache = None

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: Any) -> torch.Tensor:
        # input_ids, attention_mask, position_ids, cache positionally: the cache's keyword is
        # `past_key_values` up to transformers 5.2x and `cache` after. No mask: DCA reads padding
        # from position_ids. Only the last position's logits are computed.
        out = self.model(ids.to(self.device), None, positions.to(self.device), cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :]

    def _open(self, seq: _Sequence) -> None:
        """Give a sequence starting its prefill its own cache, seeded from the prefix cache when it can be."""
        seq.cache = DynamicCache()
        total = len(seq.prompt)
        reuse, kv = self.prefix_cache.lookup(seq.prompt, limit=total - 1) if self.prefix_cache.budget_bytes else (0, None)
        if kv is not None:
            for layer, (k, v) in enumerate(kv):
                seq.cache.update(k, v, layer)
        seq.fed = seq.cached_tokens = reuse

    def _prefill_group(self, pending: list[_Sequence]) -> list[_Sequence]:
        """Who prefills this step: the oldest prefilling sequence, joined by other sequences whose whole
        prompt fits one piece and has nothing cached, while the padded batch stays within ``prefill_chunk``
        tokens (many short prompts arriving together are read in one forward)."""
        for seq in pending:
            if seq.cache is None:
                self._guarded([seq], self._open, seq)  # a failure fails this request alone
        pending = [seq for seq in pending if seq.cache is not None]
        if not pending:
            return []
        head = pending[0]
        if not self._fresh_and_short(head):
            return [head]
        group = [head]
        for seq in pending[1:]:
            longest = max(len(s.prompt) for s in [*group, seq])
            if self._fresh_and_short(seq) and longest * (len(group) + 1) <= self.prefill_chunk:
                group.append(seq)
        return group

    def _fresh_and_short(self, seq: _Sequence) -> bool:
        return seq.fed == 0 and len(seq.prompt) <= self.prefill_chunk

    def _prefill(self, group: list[_Sequence]) -> None:
        """One prefill forward: the next piece of one prompt, or several whole short prompts left-padded."""
        if len(group) == 1:
            seq = group[0]
            total = len(seq.prompt)
            end = min(total, seq.fed + self.prefill_chunk)
            ids = torch.tensor([seq.prompt[seq.fed:end]], dtype=torch.long)
            positions = torch.arange(seq.fed, end, dtype=torch.long).unsqueeze(0)
            logits = self._forward(ids, positions, seq.cache)
            seq.fed = end
            _emit(seq, Progress(end, total))
            if end == total:
                self._prefilled(seq, logits)
            return
        # Left-padded batch of whole prompts; pads get position 1 (as `generate` gives them), so each
        # row's real tokens are the contiguous run at its end and DCA masks the pads.
        length = max(len(seq.prompt) for seq in group)
        ids = torch.zeros(len(group), length, dtype=torch.long)
        positions = torch.ones(len(group), length, dtype=torch.long)
        for row, seq in enumerate(group):
            n = len(seq.prompt)
            ids[row, length - n:] = torch.tensor(seq.prompt)
            positions[row, length - n:] = torch.arange(n)
        cache = DynamicCache()
        logits = self._forward(ids, positions, cache)
        for row, seq in enumerate(group):
            pad = length - len(seq.prompt)
            seq.cache = DynamicCache()
            for layer, kv in enumerate(cache.layers):
                seq.cache.update(kv.keys[row:row + 1, :, pad:], kv.values[row:row + 1, :, pad:], layer)
            seq.fed = len(seq.prompt)
            _emit(seq, Progress(seq.fed, seq.fed))
            self._prefilled(seq, logits[row:row + 1])

    def _prefilled(self, seq: _Sequence, logits: torch.Tensor) -> None:
        """The prompt is in the cache: sample the first token and move the sequence to the batch."""
        seq.first_token = time.monotonic()
        token = int(next_tokens(logits, seq.params, seq.generator)[0])
        with self._lock:
            self._prefilling.remove(seq)
            self._stats.prompt_tokens += len(seq.prompt)
            self._stats.cached_tokens += seq.cached_tokens
        if self._accept(seq, token):
            with self._lock:
                self._active.append(seq)
        else:
            seq.cache = None

    def _accept(self, seq: _Sequence, token: int) -> bool:
        """Record a sampled token: emit its text; finish the sequence if it ended. True if it goes on."""
        seq.tokens.append(token)
        seq.generated += 1
        text = seq.stream.push(token)
        if not seq.stream.finished and seq.generated >= seq.max_new:
            text += seq.stream.finish("length")
        if text:
            _emit(seq, Delta(text))
        if not seq.stream.finished:
            return True
        self._finish(seq)
        return False

    def _finish(self, seq: _Sequence) -> None:
        with self._lock:
            self._stats.finished += 1
            self._stats.completion_tokens += seq.generated
        kv = self._row_kv(seq)
        if kv is not None:
            self.prefix_cache.store(seq.tokens[: seq.cache_len], kv)
        _emit(seq, self._finished_event(seq, seq.stream.finish_reason or "stop"))

    def _finished_event(self, seq: _Sequence, reason: str) -> Finished:
        end = time.monotonic()
        started = seq.started or end
        first = seq.first_token or end
        return Finished(
            finish_reason=reason, text=seq.stream.text, prompt_tokens=len(seq.prompt),
            completion_tokens=seq.generated, cached_tokens=seq.cached_tokens,
            queue_s=started - seq.submitted, prefill_s=first - started, decode_s=end - first,
            token_ids=tuple(seq.tokens[len(seq.prompt):]),
        )

    def _row_kv(self, seq: _Sequence) -> LayerKV | None:
        """Per-layer ``(1, Hk, L, D)`` views of ``seq``'s keys/values (its own cache or its batch row)."""
        if seq.cache is not None:
            return [(layer.keys, layer.values) for layer in seq.cache.layers]
        if self._batch_cache is not None and seq in self._batch_rows:
            row = self._batch_rows.index(seq)
            length = self._batch_cache.get_seq_length()
            start = length - seq.cache_len
            return [(layer.keys[row:row + 1, :, start:], layer.values[row:row + 1, :, start:])
                    for layer in self._batch_cache.layers]
        return None

    def _rebuild_batch(self, rows: list[_Sequence]) -> None:
        """Make the batch cache hold exactly ``rows``, left-padded to the longest one."""
        per_row = [self._row_kv(seq) for seq in rows]
        length = max(seq.cache_len for seq in rows)
        cache = DynamicCache()
        for layer in range(len(per_row[0])):
            keys, values = [], []
            for kv in per_row:
                k, v = kv[layer]
                pad = length - k.shape[2]
                keys.append(torch.nn.functional.pad(k, (0, 0, pad, 0)) if pad else k)
                values.append(torch.nn.functional.pad(v, (0, 0, pad, 0)) if pad else v)
            cache.update(torch.cat(keys), torch.cat(values), layer)
        for seq in rows:
            seq.cache = None  # its keys/values live in the batch cache now
        self._batch_cache, self._batch_rows = cache, list(rows)

    def _decode_step(self, rows: list[_Sequence]) -> None:
        if rows != self._batch_rows:
            self._rebuild_batch(rows)
        ids = torch.tensor([[seq.tokens[-1]] for seq in rows], dtype=torch.long)
        positions = torch.tensor([[seq.cache_len] for seq in rows], dtype=torch.long)
        logits = self._forward(ids, positions, self._batch_cache)
        now = time.monotonic()
        with self._lock:
            self._stats.decode_steps += 1
            self._stats.decode_rows += len(rows)
            self._recent.append((now, len(rows)))
        greedy = [i for i, seq in enumerate(rows) if seq.params.greedy]
        chosen: dict[int, int] = {}
        if greedy:
            picks = logits[greedy].float().argmax(dim=-1).tolist()
            chosen.update(zip(greedy, picks))
        for i, seq in enumerate(rows):
            if i not in chosen:
                chosen[i] = int(next_tokens(logits[i:i + 1], seq.params, seq.generator)[0])
        ended = []
        for i, seq in enumerate(rows):
            if seq.handle.cancelled:
                continue  # dropped (with an abort event) at the next step
            if not self._accept(seq, chosen[i]):
                ended.append(seq)
        if ended:
            with self._lock:
                for seq in ended:
                    self._remove(seq)


def _emit(seq: _Sequence, event: Event) -> None:
    try:
        seq.on_event(event)
    except Exception:  # noqa: BLE001 - a broken consumer must not stop the engine
        log.exception("event callback failed for %s", seq.handle.request_id)
        seq.handle.cancel()


def _default_eos(model: Any, tokenizer: Any) -> set[int]:
    """EOS ids from the generation config and the tokenizer (int or list)."""
    found: set[int] = set()
    for value in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                  getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, (list, tuple)):
            found.update(int(v) for v in value)
    return found
