"""A generation engine for one model: conversations whose KV cache is kept between turns.

:class:`Engine` holds a loaded causal LM (normally with DCA applied, any supported family, CPU or
CUDA) and its tokenizer. :meth:`Engine.conversation` starts a :class:`Conversation`: a system
prompt, an optional long document, and the multi-turn history, rendered with the model's own
chat template. The conversation keeps one ``DynamicCache`` and the list of token ids it holds:

- each turn renders the whole conversation, finds the longest common prefix with the cached
  tokens, crops the cache there and prefills only the rest (a follow-up question on a long
  document costs only its own tokens). DCA caches keys at chunk-relative positions, so a cached
  prefix is valid as it is; when the template's rendering of a past answer differs from the tokens
  that were generated, the cache is simply re-used up to the first difference;
- prompts are prefilled ``prefill_chunk`` tokens at a time (activation memory bounded by the piece,
  not the prompt), reporting ``(tokens done, total)`` to a progress callback;
- the context limit is checked, with the numbers, before anything is prefilled;
- answers stream as text deltas (:meth:`Conversation.stream`) and stop on EOS / end-of-turn
  tokens, stop strings or ``max_new_tokens``; greedy or sampled (:mod:`.sampling`);
- an interruption (Ctrl-C, a consumer that stops iterating, an error) ends the answer with
  ``finish_reason == "abort"``: the cache is cropped back to exactly the tokens whose forward
  finished, the partial answer stays in the history, and the conversation stays usable.

Everything runs under ``torch.inference_mode``; one conversation is not thread-safe.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from ..compat import cache_keyword, crop_cache, new_dynamic_cache
from .sampling import SamplingParams, TextStream, next_tokens

Progress = Callable[[int, int], None]
"""``progress(done, total)``: prompt tokens prefilled so far out of those this prefill runs."""

#: How the document and the first question are put into the first user message.
DOCUMENT_PROMPT = "{document}\n\nAnswer the question using the document above.\n\n{question}"
#: Chat template used when the tokenizer has none (base models).
FALLBACK_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% else %}Assistant: {{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
#: Tokens that end a turn in common chat formats (used when the tokenizer knows them as single tokens).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")
_QUESTION_MARK = "\u2063chunkllama-question\u2063"  # placeholder cut out of a rendering (never tokenized)
DEFAULT_CONTEXT_FACTOR = 16  # default max context with DCA: 16x the pretraining window


class ContextLimitError(ValueError):
    """The conversation does not fit in the engine's maximum context (raised before any prefill).

    Attributes:
        prompt_tokens: tokens the prompt needs.
        max_context: the engine's limit.
        document_tokens: tokens of the document alone (None when there is no document).
    """

    def __init__(self, prompt_tokens: int, max_context: int, document_tokens: int | None = None):
        self.prompt_tokens, self.max_context, self.document_tokens = prompt_tokens, max_context, document_tokens
        doc = f" (the document alone is {document_tokens} tokens)" if document_tokens is not None else ""
        super().__init__(
            f"the conversation needs {prompt_tokens} prompt tokens{doc}, but the maximum context is "
            f"{max_context} tokens and at least one must be left for the answer. Use a shorter document, "
            "/reset the history, or raise --max-context (memory permitting)."
        )


@dataclass
class TurnResult:
    """What one turn did.

    Attributes:
        text: the answer (stop string excluded).
        finish_reason: ``"stop"`` (EOS, end of turn or a stop string), ``"length"``
            (``max_new_tokens`` or the context limit) or ``"abort"`` (interrupted).
        prompt_tokens: tokens of the rendered prompt.
        reused_tokens: of those, tokens whose KV came from the cache.
        new_tokens: generated tokens (the final EOS / end-of-turn token included).
        time_to_first_token: seconds from the start of the turn to the first sampled token.
        decode_seconds: seconds from the first sampled token to the end.
        token_ids: the generated token ids (EOS / end-of-turn excluded).
    """

    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    reused_tokens: int = 0
    new_tokens: int = 0
    time_to_first_token: float | None = None
    decode_seconds: float = 0.0
    token_ids: list[int] = field(default_factory=list)

    @property
    def prefilled_tokens(self) -> int:
        """Prompt tokens that had to be run through the model this turn."""
        return self.prompt_tokens - self.reused_tokens

    @property
    def decode_tokens_per_second(self) -> float | None:
        """Decoded tokens per second after the first one (None when fewer than two tokens)."""
        if self.new_tokens < 2 or self.decode_seconds <= 0:
            return None
        return (self.new_tokens - 1) / self.decode_seconds


class Engine:
    """A loaded model and its tokenizer, ready to run conversations.

    Args:
        model: a Hugging Face causal LM in eval mode, normally with :func:`chunkllama.apply_dca`
            applied (without it the engine still works, limited to the model's own window).
        tokenizer: its tokenizer; its chat template is used (a plain ``User:/Assistant:`` format
            when it has none).
        max_context: the most tokens (prompt + answer) a conversation may hold. Default: 16x the
            DCA pretraining length with DCA, else the model's ``max_position_embeddings``.
        prefill_chunk: prompt tokens per forward pass while prefilling (bounds activation memory).
    """

    def __init__(self, model: Any, tokenizer: Any, *, max_context: int | None = None, prefill_chunk: int = 2048):
        from .. import get_dca_config

        if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be an integer >= 1, got {prefill_chunk!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.prefill_chunk = prefill_chunk
        self.dca_config = get_dca_config(model)
        if max_context is None:
            max_context = self.default_max_context()
        if isinstance(max_context, bool) or not isinstance(max_context, int) or max_context < 2:
            raise ValueError(f"max_context must be an integer >= 2, got {max_context!r}")
        self.max_context = max_context
        self.eos_token_ids = _eos_token_ids(model, tokenizer)
        self._cache_keyword = cache_keyword(model)

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters."""
        return next(self.model.parameters()).device

    @property
    def window(self) -> int | None:
        """The model's pretraining window: the DCA pretraining length, else ``max_position_embeddings``."""
        if self.dca_config is not None:
            return self.dca_config.pretraining_length
        return getattr(_text_config(self.model), "max_position_embeddings", None)

    def default_max_context(self) -> int:
        """16x the DCA pretraining length with DCA, else the model's own window (4096 if unknown)."""
        if self.dca_config is not None:
            return DEFAULT_CONTEXT_FACTOR * self.dca_config.pretraining_length
        return int(getattr(_text_config(self.model), "max_position_embeddings", None) or 4096)

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` alone (no special tokens)."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def conversation(
        self, *, system: str | None = None, document: str | None = None, document_prompt: str = DOCUMENT_PROMPT
    ) -> "Conversation":
        """A new conversation (its own KV cache); see :class:`Conversation`."""
        return Conversation(self, system=system, document=document, document_prompt=document_prompt)

    # --- model calls (used by Conversation) -----------------------------------------------------

    def new_cache(self) -> Any:
        return new_dynamic_cache(self.model.config)

    def forward(self, token_ids: Sequence[int], cache: Any) -> torch.Tensor:
        """Run ``token_ids`` after what ``cache`` holds (extending it); next-token logits ``(vocab,)`` fp32."""
        ids = torch.tensor([list(token_ids)], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **{self._cache_keyword: cache})
        return out.logits[0, -1].float()

    def render(self, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
        """The chat-template rendering of ``messages`` as text (special tokens written out)."""
        template = None if getattr(self.tokenizer, "chat_template", None) else FALLBACK_TEMPLATE
        return self.tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def encode(self, rendered: str) -> list[int]:
        """Token ids of a rendering (the template already wrote any BOS / special tokens)."""
        return list(self.tokenizer(rendered, add_special_tokens=False)["input_ids"])


class Conversation:
    """One chat: system prompt, optional document, history, and the KV cache they fill.

    The document goes into the first user message (``document_prompt`` with ``{document}`` and
    ``{question}``); later questions are plain user messages. Create through :meth:`Engine.conversation`.
    """

    def __init__(self, engine: Engine, *, system: str | None, document: str | None, document_prompt: str):
        if document is not None and ("{document}" not in document_prompt or "{question}" not in document_prompt):
            raise ValueError("document_prompt must contain both {document} and {question}")
        self.engine = engine
        self.system = system
        self.document = document
        self.document_prompt = document_prompt
        self.history: list[dict[str, str]] = []  # user / assistant messages as asked and answered
        self.last: TurnResult | None = None
        self._cache = engine.new_cache()
        self._cached: list[int] = []  # exactly the tokens whose keys/values are in self._cache

    # --- public -------------------------------------------------------------------------------

    @property
    def cached_tokens(self) -> int:
        """Tokens whose keys/values the conversation's cache holds."""
        return len(self._cached)

    def reset(self) -> None:
        """Forget the questions and answers (the system prompt, the document and its cache stay)."""
        self.history.clear()
        self.last = None

    def messages(self, question: str | None = None) -> list[dict[str, str]]:
        """The chat messages of the conversation, plus ``question`` as a new user turn if given."""
        turns = list(self.history) + ([{"role": "user", "content": question}] if question is not None else [])
        if self.document is not None and turns:
            first = self.document_prompt.format(document=self.document, question=turns[0]["content"])
            turns[0] = {"role": "user", "content": first}
        system = [{"role": "system", "content": self.system}] if self.system is not None else []
        return system + turns

    def prompt_ids(self, question: str, answer_prefix: str | None = None) -> list[int]:
        """The token ids the model reads before answering ``question`` (and the answer's given start)."""
        rendered = self.engine.render(self.messages(question), add_generation_prompt=True)
        return self.engine.encode(rendered + (answer_prefix or ""))

    def prefill(self, progress: Progress | None = None) -> int:
        """Read everything known before the next question (the document, on the first turn) into the cache.

        Returns the number of tokens now cached. Raises :class:`ContextLimitError` first when the
        document does not fit.
        """
        rendered = self.engine.render(self.messages(_QUESTION_MARK), add_generation_prompt=True)
        ids = self.engine.encode(rendered[: rendered.index(_QUESTION_MARK)])
        self._check_fits(ids)
        reuse = self._reuse(ids, leave=0)
        self._run(ids, reuse, progress)
        return len(self._cached)

    def next_token_logits(
        self, question: str, progress: Progress | None = None, *, answer_prefix: str | None = None
    ) -> torch.Tensor:
        """Prefill the prompt for ``question`` (reusing the cache) and return the next-token logits.

        ``(vocab,)`` fp32. The question is not added to the history (this is what a turn does
        before its first token; tests compare it with a from-scratch forward).
        """
        ids = self.prompt_ids(question, answer_prefix)
        self._check_fits(ids)
        return self._run(ids, self._reuse(ids, leave=1), progress)

    def stream(
        self,
        question: str,
        params: SamplingParams | None = None,
        *,
        progress: Progress | None = None,
        answer_prefix: str | None = None,
    ) -> Iterator[str]:
        """Ask ``question``; yield the answer as text deltas. :attr:`last` holds the :class:`TurnResult`.

        ``answer_prefix`` starts the assistant's answer with the given text (it is yielded first
        and is part of the answer); the model continues from it. Small models answer questions
        about long documents far more reliably when the answer's first words are given
        (e.g. "The secret word is").

        Stopping early (Ctrl-C, ``close()`` on the iterator, an exception) ends the answer with
        ``finish_reason == "abort"`` and keeps the conversation consistent; a KeyboardInterrupt
        raised inside the model call ends the iteration quietly.
        """
        params = params or SamplingParams()
        engine = self.engine
        start = time.perf_counter()
        prefix = answer_prefix or ""
        ids = self.prompt_ids(question, prefix)
        self._check_fits(ids)
        result = TurnResult(prompt_tokens=len(ids))
        self.last = result
        reuse = self._reuse(ids, leave=1)
        result.reused_tokens = reuse
        logits = self._run(ids, reuse, progress)  # an interruption here leaves no turn behind
        stream = TextStream(engine.tokenizer, stop=params.stop, eos_token_ids=engine.eos_token_ids)
        generator = params.make_generator(logits.device)
        self.history.append({"role": "user", "content": question})
        first_token_at = None
        reason = "abort"
        try:
            if prefix:
                yield prefix
            while True:
                token = int(next_tokens(logits[None], params, generator)[0])
                if first_token_at is None:
                    first_token_at = time.perf_counter()
                    result.time_to_first_token = first_token_at - start
                result.new_tokens += 1
                delta = stream.push(token)
                if delta:
                    yield delta
                if stream.finished:
                    reason = stream.finish_reason or "stop"
                    break
                if result.new_tokens >= params.max_new_tokens or len(self._cached) + 1 >= engine.max_context:
                    reason = "length"
                    break
                logits = engine.forward([token], self._cache)
                self._cached.append(token)
        except KeyboardInterrupt:
            reason = "abort"
        finally:
            self._crop(len(self._cached))  # a forward cut short may have written some layers only
            tail = stream.finish(reason)  # type: ignore[arg-type]
            result.finish_reason = stream.finish_reason
            result.text = prefix + stream.text
            result.token_ids = stream.token_ids
            if first_token_at is not None:
                result.decode_seconds = time.perf_counter() - first_token_at
            self.history.append({"role": "assistant", "content": result.text})
        if tail:
            yield tail

    def ask(
        self,
        question: str,
        params: SamplingParams | None = None,
        *,
        progress: Progress | None = None,
        on_text: Callable[[str], None] | None = None,
        answer_prefix: str | None = None,
    ) -> TurnResult:
        """Ask ``question`` and return the whole :class:`TurnResult`; ``on_text(delta)`` sees the stream."""
        for delta in self.stream(question, params, progress=progress, answer_prefix=answer_prefix):
            if on_text is not None:
                on_text(delta)
        assert self.last is not None
        return self.last

    # --- internals ------------------------------------------------------------------------------

    def _check_fits(self, ids: list[int]) -> None:
        if len(ids) + 1 > self.engine.max_context:
            doc = self.engine.count_tokens(self.document) if self.document is not None else None
            raise ContextLimitError(len(ids), self.engine.max_context, doc)

    def _reuse(self, ids: list[int], *, leave: int) -> int:
        """Cached tokens that can stay: the common prefix, leaving at least ``leave`` tokens to run."""
        common = 0
        for a, b in zip(self._cached, ids):
            if a != b:
                break
            common += 1
        return min(common, len(ids) - leave)

    def _crop(self, length: int) -> None:
        with torch.inference_mode():
            crop_cache(self._cache, length)
        del self._cached[length:]

    def _run(self, ids: list[int], reuse: int, progress: Progress | None) -> torch.Tensor | None:
        """Keep ``ids[:reuse]`` of the cache, prefill ``ids[reuse:]`` in pieces; last logits (or None)."""
        self._crop(reuse)
        total = len(ids) - reuse
        logits = None
        if progress is not None:
            progress(0, total)
        try:
            for start in range(reuse, len(ids), self.engine.prefill_chunk):
                piece = ids[start : start + self.engine.prefill_chunk]
                logits = self.engine.forward(piece, self._cache)
                self._cached.extend(piece)
                if progress is not None:
                    progress(len(self._cached) - reuse, total)
        finally:
            self._crop(len(self._cached))  # an interrupted piece leaves the cache at the last whole piece
        return logits


def _text_config(model: Any) -> Any:
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _eos_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """EOS ids from the generation config and tokenizer, plus known end-of-turn tokens in the vocabulary."""
    ids: set[int] = set()
    generation = getattr(model, "generation_config", None)
    for value in (getattr(generation, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    vocab = tokenizer.get_vocab()
    special = set(getattr(tokenizer, "all_special_tokens", ()))
    for token in END_OF_TURN_TOKENS:
        if token in vocab and token in special:
            ids.add(int(vocab[token]))
    return frozenset(ids)


__all__ = ["DOCUMENT_PROMPT", "ContextLimitError", "Conversation", "Engine", "Progress", "TurnResult"]
