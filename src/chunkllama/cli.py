"""The ``chunkllama`` command line.

Each command is a plain typed function whose keyword-only parameters become ``--options`` (names
with dashes, types and defaults from the signature, help from the docstring's ``Args:``), and whose
docstring's first line is its help. A parameter annotated ``Annotated[T, check]`` has its value
checked by ``check`` (see :mod:`chunkllama.options`) while the arguments are parsed, before the
command runs; ``list[str]`` makes a repeatable option.

Commands are registered by name in :data:`COMMANDS` as ``"module:function"`` strings and imported
only when that command runs or shows its help, so ``chunkllama --help`` never imports torch.
Adding a command is one function plus one line here; a name with a space (``"eval passkey"``)
becomes a nested subcommand (``chunkllama eval passkey ...``). A command returns the process exit
code (None means 0).

Errors: a bad option value is one line, ``chunkllama CMD: error: --option VALUE: what is wrong;
accepted: ...``, exit code 2; any other failure is one line with exit code 1. ``--debug`` (or the
environment variable ``CHUNKLLAMA_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import inspect
import os
import re
import sys
import types
import typing
from typing import Any, Callable, Sequence

# Registration: command name -> "module:function" (or the function itself). "group name" makes
# `chunkllama group name`. The module is imported only when its command runs or shows its help.
COMMANDS: dict[str, str | Callable[..., int | None]] = {
    "demo": "chunkllama.demo:demo",
    "chat": "chunkllama.serving.chat:chat",
    "serve": "chunkllama.serving.server:serve",
    "plan": "chunkllama.planner:plan",
    "finetune": "chunkllama.training.command:finetune",
    "eval ppl": "chunkllama.eval.commands:eval_ppl",
    "eval passkey": "chunkllama.eval.commands:eval_passkey",
    "eval needle": "chunkllama.eval.commands:eval_needle",
    "eval longqa": "chunkllama.eval.commands:eval_longqa",
    "eval ruler": "chunkllama.eval.ruler_command:eval_ruler",
}

# Commands that serve one user from one process (stdin, a socket): refused under torchrun. Every other
# command runs there as it is: the model is sharded over the processes, rank 0 prints and writes.
SINGLE_PROCESS = frozenset({"chat", "serve"})

# Descriptions of command groups (the first word of a two-word command name).
GROUPS: dict[str, str] = {
    "eval": "Evaluate long-context methods (none, pi, ntk, yarn, dca) on a model: PG19 perplexity, passkey "
            "retrieval, needle in a haystack, long-document QA. Each writes summary.json, samples.jsonl and "
            "table.md (and plots) to --output.",
}

DEBUG_ENV = "CHUNKLLAMA_DEBUG"
USAGE_ERROR = 2  # bad arguments (argparse's code too)
FAILURE = 1


# --- registry -----------------------------------------------------------------------------------


def resolve(target: str | Callable[..., Any]) -> Callable[..., Any]:
    """The command function of a registry entry (imports its module)."""
    if callable(target):
        return target
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def summary_of(target: str | Callable[..., Any]) -> str:
    """First line of a command's docstring, read from its source file without importing it."""
    if callable(target):
        return _docstring_parts(inspect.getdoc(target) or "")[0]
    module, _, name = target.partition(":")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return ""
    with open(spec.origin, encoding="utf-8") as handle:
        tree = ast.parse(handle.read(), spec.origin)
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return _docstring_parts(ast.get_docstring(node) or "")[0]
    return ""


# --- argparse from signatures ------------------------------------------------------------------


def _plain(text: str) -> str:
    """Docstring text as help: reST literals ``x`` -> x, and ``%`` escaped for argparse."""
    return re.sub(r"``([^`]+)``", r"\1", text).replace("%", "%%")


def _docstring_parts(doc: str) -> tuple[str, str, dict[str, str]]:
    """``(summary, description, {arg: help})`` from a Google-style docstring."""
    head, _, args_block = doc.partition("\nArgs:\n")
    summary, _, description = head.strip().partition("\n")
    helps: dict[str, str] = {}
    current = None
    for line in args_block.splitlines():
        match = re.match(r"^\s{4}(\w+):\s*(.*)$", line)
        if match:
            current = match.group(1)
            helps[current] = match.group(2)
        elif current and line.startswith(" " * 8):
            helps[current] += " " + line.strip()
        elif line.strip():
            current = None
    return summary.strip(), description.strip(), helps


def _unpack(annotation: Any) -> tuple[Any, Callable[[str], Any] | None, bool]:
    """``(base type, check or None, repeatable)`` of ``T``, ``T | None``, ``list[T]``, ``Annotated[T, check]``."""
    check = None
    if typing.get_origin(annotation) is typing.Annotated:
        base, *extras = typing.get_args(annotation)
        check = next((e for e in extras if callable(e)), None)
        annotation = base
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported option type {annotation!r}")
        base, _, repeatable = _unpack(args[0])
        return base, check, repeatable
    if origin in (list, tuple, Sequence):
        (item, *_rest) = typing.get_args(annotation) or (str,)
        return item, check, True
    return annotation, check, False


_PLAIN_ACCEPTED = {int: "a whole number, e.g. 8", float: "a number, e.g. 0.5", str: "text"}


def _converter(kind: Any, check: Callable[[str], Any] | None, flag: str) -> Callable[[str], Any]:
    """An argparse ``type=`` that reports a bad value as ``FLAG VALUE: problem; accepted: ...``."""
    from .options import OptionError

    def convert(text: str) -> Any:
        try:
            if check is not None:
                return check(text)
            return kind(text)
        except OptionError as exc:
            raise argparse.ArgumentTypeError(str(exc.for_option(flag))) from None
        except ValueError:
            accepted = _PLAIN_ACCEPTED.get(kind, getattr(kind, "__name__", str(kind)))
            raise argparse.ArgumentTypeError(
                str(OptionError(text, f"not {'an' if kind is int else 'a'} {getattr(kind, '__name__', kind)}",
                                accepted, option=flag))
            ) from None

    convert.__name__ = getattr(check, "__name__", getattr(kind, "__name__", "value"))
    return convert


def _help_text(text: str, default: Any, kind: Any) -> str:
    """The option's help, with its default appended unless the text already states it."""
    text = _plain(text)
    if default is None or default is inspect.Parameter.empty or "default" in text.lower():
        return text
    shown = ("on" if default else "off") if kind is bool else default
    return f"{text} (default: {str(shown).replace('%', '%%')})"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: ``PROG: error: --option VALUE: ...``, exit 2."""

    def error(self, message: str) -> typing.NoReturn:  # noqa: D102
        match = re.match(r"^argument (\S+): (.*)$", message, re.S)
        if match:
            flag, rest = match.groups()
            flag = flag.split("/")[-1] if flag.startswith("--") else flag
            choice = re.match(r"invalid choice: '(.*)' \(choose from (.*)\)$", rest)
            if choice:
                rest = f"{flag} {choice.group(1)}: unknown command; accepted: {choice.group(2).replace(chr(39), '')}"
            elif not rest.startswith(flag):
                rest = f"{flag}: {rest}"
            message = rest
        required = re.match(r"^the following arguments are required: (.*)$", message)
        if required:
            missing = required.group(1).split(", ")[0]
            subparsers = [a for a in self._actions if isinstance(a, argparse._SubParsersAction)]  # noqa: SLF001
            accepted = ", ".join(subparsers[0].choices) if subparsers and missing == "COMMAND" else "see --help"
            message = f"{missing}: missing; accepted: {accepted}"
        self.exit(USAGE_ERROR, f"{self.prog}: error: {' '.join(message.split())}\n")


def add_command(subparsers: Any, name: str, func: Callable[..., Any]) -> argparse.ArgumentParser:
    """Add ``func`` as subcommand ``name``: keyword-only parameters become ``--options``."""
    summary, description, helps = _docstring_parts(inspect.getdoc(func) or "")
    parser = subparsers.add_parser(
        name, help=_plain(summary), description=_plain((summary + "\n\n" + description).strip()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    hints = typing.get_type_hints(func, include_extras=True)
    for param in inspect.signature(func).parameters.values():
        if param.kind is not param.KEYWORD_ONLY:
            raise TypeError(f"{func.__name__}: CLI commands take keyword-only parameters, not {param.name!r}")
        kind, check, repeatable = _unpack(hints[param.name])
        flag = "--" + param.name.replace("_", "-")
        text = _help_text(helps.get(param.name, ""), param.default, kind)
        if kind is bool:
            action = parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=param.default)
            action.help = text  # BooleanOptionalAction may append its own default; state it once
        elif repeatable:
            parser.add_argument(flag, type=_converter(kind, check, flag), action="append", help=text,
                                default=None if param.default is inspect.Parameter.empty else param.default,
                                required=param.default is inspect.Parameter.empty, metavar=param.name.upper())
        elif param.default is inspect.Parameter.empty:
            parser.add_argument(flag, type=_converter(kind, check, flag), required=True, help=text)
        else:
            parser.add_argument(flag, type=_converter(kind, check, flag), default=param.default, help=text)
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help=f"on errors show the full traceback (also: {DEBUG_ENV}=1)")
    parser.set_defaults(_command=func)
    return parser


def _check_none_defaults(func: Callable[..., Any], values: dict[str, Any]) -> None:
    """Run the checks marked ``checks_default`` (e.g. :func:`chunkllama.options.model`) on None defaults.

    argparse runs ``type=`` on string defaults only; a None default (the bundled model, say) is
    checked here, still before the command runs.
    """
    from .options import OptionError

    hints = typing.get_type_hints(func, include_extras=True)
    for param in inspect.signature(func).parameters.values():
        _, check, _ = _unpack(hints[param.name])
        if check is not None and getattr(check, "checks_default", False) and values.get(param.name) is None:
            try:
                check(None)
            except OptionError as exc:
                raise exc.for_option("--" + param.name.replace("_", "-")) from None


def build_parser(
    commands: dict[str, str | Callable[..., Any]] | None = None, *, only: str | None = "*"
) -> argparse.ArgumentParser:
    """The ``chunkllama`` parser with one subcommand per entry of ``commands`` (default :data:`COMMANDS`).

    ``only`` names the one command whose options are built (its module is imported); the others
    get their one-line help only. ``"*"`` builds every command, None none.
    """
    parser = _Parser(
        prog="chunkllama", description="Training-free long context for Hugging Face LLMs (Dual Chunk Attention).",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"chunkllama {__version__}")
    parser.add_argument("--debug", action="store_true", default=False,
                        help=f"on errors show the full traceback (also: {DEBUG_ENV}=1)")
    top = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    groups: dict[str, Any] = {}
    for name, target in (commands if commands is not None else COMMANDS).items():
        group, _, leaf = name.rpartition(" ")
        where = top
        if group:
            if group not in groups:
                text = GROUPS.get(group, f"{group} commands")
                group_parser = top.add_parser(group, help=text.split(". ")[0].rstrip(".") + ".",
                                              description=text)
                groups[group] = group_parser.add_subparsers(dest=f"{group}_command", metavar="COMMAND",
                                                            required=True, parser_class=_Parser)
            where = groups[group]
        if only == "*" or only == name:
            add_command(where, leaf, resolve(target))
        else:
            where.add_parser(leaf, help=_plain(summary_of(target)))
    return parser


def selected_command(argv: Sequence[str], names: Sequence[str]) -> str | None:
    """The registered command that ``argv`` runs (``"eval ppl"``), or None (e.g. top-level --help)."""
    words = [a for a in argv if not a.startswith("-")][:2]
    for count in (2, 1):
        name = " ".join(words[:count])
        if len(words) >= count and name in names:
            return name
    return None


def _debug_requested(argv: Sequence[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _prog(name: str | None) -> str:
    return "chunkllama" + (f" {name}" if name else "")


def main(argv: Sequence[str] | None = None, commands: dict[str, str | Callable[..., Any]] | None = None) -> int:
    """Entry point of the ``chunkllama`` console script; returns the exit code.

    ``--help``, ``--version`` and bad arguments end in ``SystemExit`` (code 0 or 2) as with argparse;
    an error while the command runs returns 2 (a bad option value found then) or 1 (anything else).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = COMMANDS if commands is None else commands
    name = selected_command(argv, list(commands))
    debug = _debug_requested(argv)
    try:
        parser = build_parser(commands, only=name)
    except ImportError as exc:  # a command whose optional dependencies are not installed
        if debug:
            raise
        print(f"{_prog(name)}: error: this command needs {exc.name or exc}, which is not installed "
              f"(see the README for the install command)", file=sys.stderr)
        return FAILURE
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub = _find_subparser(parser, name)
        sub.error(f"{extra[0]}: unknown option; accepted: the options listed by `{sub.prog} --help`")
    from . import distributed

    rank_tag = f"[rank {distributed.rank()}] " if distributed.world_size() > 1 else ""
    if distributed.world_size() > 1 and name in SINGLE_PROCESS:
        print(f"{_prog(name)}: error: {rank_tag}runs in one process, not under torchrun "
              f"({distributed.world_size()} processes); use --device auto to split a large model over GPUs",
              file=sys.stderr)
        return USAGE_ERROR
    values = vars(args)
    func = values.pop("_command")
    kwargs = {k: v for k, v in values.items() if k in inspect.signature(func).parameters}
    from .options import OptionError

    try:
        _check_none_defaults(func, kwargs)
    except OptionError as exc:
        _find_subparser(parser, name).error(str(exc))
    try:
        with distributed.quiet_unless_main():  # under torchrun only rank 0 prints (its files: see the commands)
            return int(func(**kwargs) or 0)
    except Exception as exc:  # one line unless --debug
        if debug:
            raise
        code = USAGE_ERROR if isinstance(exc, OptionError) else FAILURE
        text = str(exc) if isinstance(exc, OptionError) else f"{type(exc).__name__}: {exc}"
        hint = "" if isinstance(exc, OptionError) else f" (run with --debug or {DEBUG_ENV}=1 for the traceback)"
        print(f"{_prog(name)}: error: {rank_tag}{' '.join(text.split())}{hint}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{_prog(name)}: interrupted", file=sys.stderr)
        return 130
    finally:
        distributed.end_process_group()


def _find_subparser(parser: argparse.ArgumentParser, name: str | None) -> argparse.ArgumentParser:
    """The parser of command ``name`` (the top-level parser when None)."""
    current = parser
    for word in (name or "").split():
        action = next(a for a in current._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
        current = action.choices[word]
    return current


if __name__ == "__main__":
    sys.exit(main())
