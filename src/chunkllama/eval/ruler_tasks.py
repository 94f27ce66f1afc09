"""RULER-style synthetic tasks: prompts, expected answers and scoring, offline and seeded.

The task definitions follow RULER (Hsieh et al. 2024, "RULER: What's the Real Context Size of
Your Long-Context Language Models?", github.com/NVIDIA/RULER, ``scripts/synthetic.yaml``):

=============== ======== ====== ====== ===================================================
task            haystack key    value  needles: keys x values, queried keys
=============== ======== ====== ====== ===================================================
niah_single_1   noise    word   number 1 x 1, 1
niah_single_2   essay    word   number 1 x 1, 1
niah_single_3   essay    word   uuid   1 x 1, 1
niah_multikey_1 essay    word   number 4 x 1, 1 (3 distractor keys)
niah_multikey_2 needle   word   number 1 x 1, 1 (the haystack is distractor needles)
niah_multikey_3 needle   uuid   uuid   1 x 1, 1
niah_multivalue essay    word   number 1 x 4, 1 (all 4 values expected)
niah_multiquery essay    word   number 4 x 1, 4 (all 4 values expected)
vt              noise    --     --     variable tracking: 1 chain of 4 hops, all 5 names
cwe             --       --     --     the 10 words listed 30x among words listed 3x
fwe             --       --     --     the 3 most frequent coded words of a Zipf(2) text
=============== ======== ====== ====== ===================================================

vt and cwe start with one solved example, as in RULER.

Haystacks: ``essay`` = the Paul Graham essays (the caller passes their text, e.g.
:func:`chunkllama.eval.data.essays_text`), split on whitespace into words, repeated when too short,
cut into sentences after ``.``/``!``/``?`` (a regular expression standing in for RULER's NLTK
``sent_tokenize``); needles go between sentences. ``noise`` = the passkey filler sentence repeated,
one per line; ``needle`` = distractor needles with random keys and values, one per line.
Templates, needle sentence and answer prefixes are RULER's (``scripts/data/synthetic/constants.py``).

Values: 7-digit numbers, adjective-noun words (``"quizzical-aardvark"``) and version-4 UUIDs, all
drawn from one ``random.Random`` per sample, seeded by the string
``"ruler:{task}:{length}:{index}:{seed}"`` (string seeds are hashed with SHA-512 by Python, so a
prompt is identical in every process). Word lists come from the ``wonderwords`` package, as in
RULER (its noun / adjective / verb lists, sorted and de-duplicated; the version is recorded by
:func:`word_list_version`).

Length: as in RULER, ``length`` counts the prompt *and* the answer budget: the haystack size (words,
sentences, distractors, list entries) is the largest with ``tokens(prompt) + max_new_tokens <=
length``, found by a bracketing search from a hint followed by bisection, so a prompt falls short of
the budget by less than one haystack unit (one word, one noise sentence, one distractor needle, one
list entry). Tokens are counted on the full prompt text (chat template included) without adding
special tokens.

Depth: a needle's depth is the fraction of the haystack before it: of its lines (noise, distractor
needles), or of its words for the essay, where the needle goes at the sentence boundary nearest to
that fraction of the words (RULER uses the fraction of sentences; words track tokens more closely).
For the NIAH tasks the sample's *target* needle (the one holding ``answers[0]``) goes at the
requested depth; the other needles, and the target when no depth is requested, take distinct depths
drawn from RULER's grid of 40 depths ``round(linspace(0, 100, 40)) / 100``. vt places its chain
lines at random lines in order, as RULER does.

Scoring (:func:`string_match_all`): recall of the expected strings in the answer, case-insensitive,
as a fraction in [0, 1] (RULER reports the mean x 100). The answer is first cleaned as RULER's
evaluator does (control characters become newlines, outer whitespace is stripped).

Deviations from RULER, all deliberate: sentence splitting by regex instead of NLTK; needles at a
requested depth (RULER samples depths only); vt's one in-context example is fitted to
``min(500, length // 4)`` tokens (RULER: 500), but keeps at least its chain, so short test lengths
stay possible; cwe draws adjective-noun compounds when it needs more distinct words than
wonderwords has (RULER falls back to an English word list it ships); fwe's haystack size is
bisected to the token budget (RULER steps by ``length // 32`` words); the answer prefix loses its
leading space when it follows a chat template's generation prompt; vt's assignment lines carry no
trailing space. RULER's two QA tasks (SQuAD, HotpotQA) are not included: their data is not in
``../shared/data``.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import math
import random
import re
import string
import types
import uuid
from typing import Any, Callable, Collection, Mapping, Sequence

# ----------------------------------------------------------------------------- task definitions

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."

NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
    "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
)
NIAH_ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
)
VT_ANSWER_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
    "assigned the value {query}, they are: "
)
CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
    "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?"
)
CWE_ANSWER_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most "
    "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
    "the dots '....'. What are the three most frequently appeared words in the above coded text?"
)
FWE_ANSWER_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"

#: RULER's insertion depths: 40 evenly spaced percentages 0..100, rounded, as fractions.
DEPTH_GRID = tuple(round(100 * i / 39) / 100 for i in range(40))

#: Tokens generated per answer, by family (RULER's ``tokens_to_generate``).
MAX_NEW_TOKENS = types.MappingProxyType(
    {"niah": 128, "variable_tracking": 30, "common_words_extraction": 120, "freq_words_extraction": 50}
)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One RULER task: its family and the family's parameters (RULER's ``synthetic.yaml``)."""

    name: str
    family: str
    params: tuple[tuple[str, Any], ...]

    def param(self, key: str) -> Any:
        return dict(self.params)[key]

    @property
    def max_new_tokens(self) -> int:
        return MAX_NEW_TOKENS[self.family]


def _niah(name: str, haystack: str, key: str, value: str, k: int = 1, v: int = 1, q: int = 1) -> TaskSpec:
    params = (("type_haystack", haystack), ("type_needle_k", key), ("type_needle_v", value),
              ("num_needle_k", k), ("num_needle_v", v), ("num_needle_q", q))
    return TaskSpec(name, "niah", params)


TASKS: Mapping[str, TaskSpec] = types.MappingProxyType({
    spec.name: spec
    for spec in (
        _niah("niah_single_1", "noise", "words", "numbers"),
        _niah("niah_single_2", "essay", "words", "numbers"),
        _niah("niah_single_3", "essay", "words", "uuids"),
        _niah("niah_multikey_1", "essay", "words", "numbers", k=4),
        _niah("niah_multikey_2", "needle", "words", "numbers"),
        _niah("niah_multikey_3", "needle", "uuids", "uuids"),
        _niah("niah_multivalue", "essay", "words", "numbers", v=4),
        _niah("niah_multiquery", "essay", "words", "numbers", k=4, q=4),
        TaskSpec("vt", "variable_tracking", (("type_haystack", "noise"), ("num_chains", 1), ("num_hops", 4))),
        TaskSpec("cwe", "common_words_extraction", (("freq_cw", 30), ("freq_ucw", 3), ("num_cw", 10))),
        TaskSpec("fwe", "freq_words_extraction", (("alpha", 2.0), ("coded_wordlen", 6))),
    )
})
TASK_NAMES = tuple(TASKS)


def needs_essay(tasks: Sequence[str]) -> bool:
    """Whether any of ``tasks`` uses the essay haystack."""
    return any(TASKS[t].family == "niah" and TASKS[t].param("type_haystack") == "essay" for t in tasks)


def parse_tasks(text: str | Sequence[str] | None) -> list[str]:
    """``"all"`` / None -> every task; ``"niah"`` -> the NIAH tasks; else comma-separated names.

    Raises:
        ValueError: an unknown task name (the message lists the valid ones).
    """
    items = [text] if isinstance(text, str) or text is None else list(text)
    names: list[str] = []
    for item in items:
        for part in (p.strip().lower() for p in (item or "all").split(",")):
            if not part:
                continue
            if part == "all":
                names.extend(TASK_NAMES)
            elif part == "niah":
                names.extend(n for n in TASK_NAMES if n.startswith("niah"))
            elif part in TASKS:
                names.append(part)
            else:
                raise ValueError(f"Unknown RULER task {part!r}; choose from all, niah, {', '.join(TASK_NAMES)}.")
    return list(dict.fromkeys(names))


# ----------------------------------------------------------------------------- word lists


@functools.lru_cache(maxsize=1)
def _wonderwords() -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(nouns, adjectives, verbs) of the ``wonderwords`` package, each sorted and unique."""
    from importlib import resources

    try:
        assets = resources.files("wonderwords.assets")
    except ModuleNotFoundError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("The RULER-style tasks need the word lists of `pip install wonderwords`.") from exc

    def read(name: str) -> tuple[str, ...]:
        words = (line.strip() for line in assets.joinpath(name).read_text(encoding="utf-8").splitlines())
        return tuple(sorted({w for w in words if w}))

    return read("nounlist.txt"), read("adjectivelist.txt"), read("verblist.txt")


def word_list_version() -> str:
    """The ``wonderwords`` version the word lists come from (written into result files)."""
    from importlib.metadata import version

    return version("wonderwords")


# ----------------------------------------------------------------------------- random values


def _random_value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        nouns, adjectives, _ = _wonderwords()
        return f"{rng.choice(adjectives)}-{rng.choice(nouns)}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown needle type {kind!r}")


def _distinct_values(rng: random.Random, kind: str, n: int, avoid: Collection[str] = ()) -> list[str]:
    values: list[str] = []
    while len(values) < n:
        value = _random_value(rng, kind)
        if value not in avoid and value not in values:
            values.append(value)
    return values


def sample_seed(task: str, length: int, index: int, seed: int) -> str:
    """The string seeding sample ``index`` of ``task`` at ``length`` (stable across processes)."""
    return f"ruler:{task}:{length}:{index}:{seed}"


# ----------------------------------------------------------------------------- rendering


@dataclasses.dataclass(frozen=True)
class Needle:
    """A string inserted into the haystack.

    Attributes:
        text: the inserted line, e.g. ``"One of the special magic numbers for x-y is: 1234567."``.
        depth: the depth it was placed at, a fraction in [0, 1].
        slot: haystack slots (essay sentences / lines) before it: ``int(depth * n_slots)`` for lines,
            the sentence boundary nearest to ``depth`` of the words for the essay.
        is_target: whether this needle holds ``answers[0]`` (the depth a NIAH sample is filed under).
    """

    text: str
    depth: float
    slot: int
    is_target: bool = False


@dataclasses.dataclass(frozen=True)
class Draft:
    """A sample before the chat template: user text, answer prefix, answers and needles.

    ``context`` is the haystack with the needles (a substring of ``user_text``); ``n_slots`` the
    sentences / lines of the haystack without the needles.
    """

    user_text: str
    answer_prefix: str
    answers: tuple[str, ...]
    context: str
    needles: tuple[Needle, ...] = ()
    n_slots: int = 0


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``: split after ``.``, ``!`` or ``?`` followed by whitespace."""
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


def essay_words(essay: str) -> tuple[str, ...]:
    """The essay haystack as RULER reads it: the text split on runs of whitespace."""
    words = tuple(w for w in re.split(r"\s+", essay) if w)
    if not words:
        raise ValueError("The essay haystack is empty; pass the text of the Paul Graham essays.")
    return words


def _insert(
    slots: list[str], needles: Sequence[tuple[str, float, bool]], slot_of: Callable[[float], int] | None = None
) -> tuple[list[str], list[Needle]]:
    """Insert ``(text, depth, is_target)`` needles into ``slots`` before slot ``slot_of(depth)``.

    ``slot_of`` defaults to ``int(depth * len(slots))``. Needles at the same slot keep their order.
    Returns (lines, placed needles in text order).
    """
    n = len(slots)
    where = slot_of or (lambda depth: min(int(depth * n), n))
    placed = sorted((Needle(text, depth, where(depth), target) for text, depth, target in needles),
                    key=lambda needle: needle.slot)
    out: list[str] = []
    start = 0
    for needle in placed:
        out.extend(slots[start : needle.slot])
        out.append(needle.text)
        start = needle.slot
    out.extend(slots[start:])
    return out, placed


def _word_depth_slot(sentences: Sequence[str]) -> Callable[[float], int]:
    """``depth -> sentence boundary`` whose share of the words before it is nearest to ``depth``."""
    before = [0]
    for sentence in sentences:
        before.append(before[-1] + len(sentence.split()))
    total = before[-1]

    def slot(depth: float) -> int:
        target = depth * total
        i = bisect.bisect_left(before, target)
        if i > 0 and (i == len(before) or target - before[i - 1] <= before[i] - target):
            i -= 1
        return i

    return slot


def _depths(rng: random.Random, count: int, target_depth: float | None) -> list[float]:
    """``count`` distinct depths from RULER's grid; the first is ``target_depth`` when given."""
    depths = rng.sample(DEPTH_GRID, count)
    if target_depth is not None:
        depths[0] = target_depth
    return depths


def _niah_renderer(
    spec: TaskSpec, key: str, depth: float | None, words: Sequence[str] | None
) -> Callable[[int], Draft]:
    p = dict(spec.params)
    rng = random.Random(key)
    n_keys = max(p["num_needle_k"], p["num_needle_q"])
    keys = _distinct_values(rng, p["type_needle_k"], n_keys)
    values = [_distinct_values(rng, p["type_needle_v"], p["num_needle_v"]) for _ in keys]
    queried = rng.sample(range(n_keys), p["num_needle_q"])
    answers = tuple(v for i in queried for v in values[i])
    target = (queried[0], 0)
    type_v = p["type_needle_v"]
    needles = [
        (NEEDLE.format(type_needle_v=type_v, key=keys[i], value=values[i][j]), (i, j) == target)
        for i in range(n_keys) for j in range(p["num_needle_v"])
    ]
    rng.shuffle(needles)
    depths = _depths(rng, len(needles), depth)
    # the target needle takes the first depth (the requested one)
    order = sorted(range(len(needles)), key=lambda i: not needles[i][1])
    placed_spec = [(needles[i][0], d, needles[i][1]) for i, d in zip(order, depths)]

    query_keys = [keys[i] for i in queried]
    query = query_keys[0] if len(query_keys) == 1 else ", ".join(query_keys[:-1]) + ", and " + query_keys[-1]
    template, prefix, type_word = NIAH_TEMPLATE, NIAH_ANSWER_PREFIX, type_v
    if p["num_needle_q"] * p["num_needle_v"] == 1:  # RULER's singular wording
        template, prefix = (
            t.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")
            for t in (template, prefix)
        )
        type_word = type_v[:-1]
    haystack = p["type_haystack"]
    if haystack == "essay" and not words:
        raise ValueError(f"{spec.name} needs the essay haystack: pass essay=<text of the Paul Graham essays>.")
    avoid = set(keys)

    def render(n: int) -> Draft:
        if haystack == "essay":
            assert words is not None
            repeated = [words[i % len(words)] for i in range(n)]
            slots = split_sentences(" ".join(repeated))
            lines, placed = _insert(slots, placed_spec, _word_depth_slot(slots))
            context = " ".join(lines)
        else:
            if haystack == "noise":
                slots = [NOISE] * n
            else:  # distractor needles; their own rng so distractor i does not depend on n
                hay_rng = random.Random(key + ":haystack")
                slots = [
                    NEEDLE.format(
                        type_needle_v=type_v,
                        key=_distinct_values(hay_rng, p["type_needle_k"], 1, avoid)[0],
                        value=_random_value(hay_rng, type_v),
                    )
                    for _ in range(n)
                ]
            lines, placed = _insert(slots, placed_spec)
            context = "\n".join(lines)
        user = template.format(type_needle_v=type_word, context=context, query=query)
        return Draft(user, prefix.format(type_needle_v=type_word, query=query), answers, context, tuple(placed),
                     len(slots))

    return render


def _vt_text(rng: random.Random, n: int, hops: int, name_len: int) -> tuple[str, str, list[str]]:
    """(context, value, variable names) of one variable-tracking chain in ``n`` noise lines."""
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=name_len))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]}" for j in range(hops)]
    lines = [NOISE] * n
    positions = sorted(rng.sample(range(n), len(chain))) if n >= len(chain) else list(range(len(chain)))
    for j, (pos, line) in enumerate(zip(positions, chain)):
        lines.insert(pos + j, line)
    return "\n".join(lines), value, names


def _vt_renderer(spec: TaskSpec, key: str, icl: str) -> Callable[[int], Draft]:
    hops = spec.param("num_hops")
    if spec.param("num_chains") != 1:
        raise NotImplementedError("variable tracking with several chains is not implemented")

    def render(n: int) -> Draft:
        rng = random.Random(key)
        context, value, names = _vt_text(rng, n, hops, 5)
        user = icl + VT_TEMPLATE.format(context=context, query=value)
        return Draft(user, VT_ANSWER_PREFIX.format(num_v=hops + 1, query=value), tuple(names), context,
                     n_slots=n)

    return render


def _vt_example(key: str, n: int, hops: int) -> str:
    """RULER's in-context example for vt: a solved chain with 3-letter names in ``n`` noise lines."""
    rng = random.Random(key + ":example")
    context, value, names = _vt_text(rng, n, hops, 3)
    return (VT_TEMPLATE.format(context=context, query=value) + VT_ANSWER_PREFIX.format(num_v=hops + 1, query=value)
            + " " + " ".join(names) + "\n")


def _cwe_words(rng: random.Random, n: int) -> list[str]:
    """``n`` distinct words: wonderwords' nouns + adjectives + verbs, then adjective-noun compounds."""
    nouns, adjectives, verbs = _wonderwords()
    pool = sorted(set(nouns) | set(adjectives) | set(verbs))
    if n <= len(pool):
        return rng.sample(pool, n)
    chosen = list(pool)
    rng.shuffle(chosen)
    seen = set(chosen)
    while len(chosen) < n:
        word = f"{rng.choice(adjectives)}-{rng.choice(nouns)}"
        if word not in seen:
            seen.add(word)
            chosen.append(word)
    return chosen


def _cwe_list(rng: random.Random, n_words: int, common: int, uncommon: int, n_common: int) -> tuple[str, list[str]]:
    words = _cwe_words(rng, n_words)
    top, rest = words[:n_common], words[n_common:]
    entries = top * common + rest * uncommon
    rng.shuffle(entries)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(entries)), top


def _cwe_renderer(spec: TaskSpec, key: str, length: int) -> Callable[[int], Draft]:
    n_common = spec.param("num_cw")
    if length < 4096:  # RULER's short-context setting
        example_args, common, uncommon = (20, 3, 1), 6, 1
    else:
        example_args, common, uncommon = (40, 10, 3), spec.param("freq_cw"), spec.param("freq_ucw")

    def render(n: int) -> Draft:
        rng = random.Random(key)
        example_context, example_answer = _cwe_list(rng, example_args[0], example_args[1], example_args[2], n_common)
        example = (CWE_TEMPLATE.format(context=example_context) + CWE_ANSWER_PREFIX + " "
                   + " ".join(f"{i + 1}. {w}" for i, w in enumerate(example_answer)))
        context, answer = _cwe_list(rng, n_common + n, common, uncommon, n_common)
        user = example + "\n" + CWE_TEMPLATE.format(context=context)
        return Draft(user, CWE_ANSWER_PREFIX, tuple(answer), context, n_slots=n)

    return render


def zeta(alpha: float, terms: int = 1000) -> float:
    """Riemann zeta(alpha) for alpha > 1 (direct sum plus the Euler-Maclaurin tail; ~1e-12 relative)."""
    if alpha <= 1:
        raise ValueError("zeta needs alpha > 1")
    head = sum(k**-alpha for k in range(1, terms))
    n = float(terms)
    return head + n ** (1 - alpha) / (alpha - 1) + 0.5 * n**-alpha + alpha * n ** (-alpha - 1) / 12


def fwe_counts(n_words: int, vocab_size: int, alpha: float) -> list[int]:
    """Occurrences of the words of rank 1..vocab_size: ``int(n_words * k**-alpha / zeta(alpha))``."""
    z = zeta(alpha)
    return [int(n_words * k**-alpha / z) for k in range(1, vocab_size + 1)]


def _fwe_renderer(spec: TaskSpec, key: str, length: int) -> Callable[[int], Draft]:
    alpha, word_len = spec.param("alpha"), spec.param("coded_wordlen")
    vocab_size = max(5, (length - spec.max_new_tokens) // 50)

    def render(n: int) -> Draft:
        rng = random.Random(key)
        vocab: set[str] = set()
        while len(vocab) < vocab_size:
            vocab.add("".join(rng.choices(string.ascii_lowercase, k=word_len)))
        ranked = sorted(vocab)
        rng.shuffle(ranked)
        ranked[0] = "..."  # the most frequent "word" is noise
        words = [w for w, c in zip(ranked, fwe_counts(n, vocab_size, alpha)) for _ in range(c)]
        rng.shuffle(words)
        context = " ".join(words)
        return Draft(FWE_TEMPLATE.format(context=context), FWE_ANSWER_PREFIX, tuple(ranked[1:4]), context, n_slots=n)

    return render


# ----------------------------------------------------------------------------- prompts


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def wrap(tokenizer: Any, draft: Draft, use_chat: bool) -> str:
    """The full prompt text: the user text (in the chat template when ``use_chat``) + answer prefix."""
    if not use_chat:
        return draft.user_text + draft.answer_prefix
    messages = [{"role": "user", "content": draft.user_text}]
    head = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return head + (draft.answer_prefix.lstrip() if head[-1:].isspace() else draft.answer_prefix)


def fit_units(count: Callable[[int], int], budget: int, hint: int, minimum: int = 1) -> int:
    """The largest ``n >= minimum`` with ``count(n) <= budget`` (``count`` nondecreasing).

    Starts at ``hint``, moves by up to three secant steps of the line through the evaluated points
    (token counts grow about linearly with the haystack), brackets the answer by doubling steps,
    then bisects. The result was evaluated and fits; ``n + 1`` was evaluated and does not (unless
    the search stopped at ``minimum``). Each evaluation tokenizes a whole prompt, so the number of
    evaluations is what costs: about 5-10 from a fair hint, 2-3 from the previous sample's size.

    Raises:
        ValueError: not even ``count(minimum)`` fits.
    """
    cache: dict[int, int] = {}

    def fits(n: int) -> bool:
        if n not in cache:
            cache[n] = count(n)
        return cache[n] <= budget

    if not fits(minimum):
        raise ValueError(f"needs {cache[minimum]} tokens at the smallest haystack, more than the {budget} available")
    n = max(minimum, hint)
    previous = minimum
    for _ in range(3):
        fits(n)
        if n == previous or cache[n] == cache[previous]:
            break
        slope = (cache[n] - cache[previous]) / (n - previous)
        guess = max(minimum, n + int((budget - cache[n]) / slope) if slope > 0 else n)
        if guess == n:
            break
        previous, n = n, guess
    step = 1
    if fits(n):
        lo = n
        while fits(lo + step):
            lo += step
            step *= 2
        hi = lo + step
    else:
        hi = n
        while hi - step > minimum and not fits(hi - step):
            hi -= step
            step *= 2
        lo = max(minimum, hi - step)
    while hi - lo > 1:  # lo fits, hi does not
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


@dataclasses.dataclass(frozen=True)
class RulerSample:
    """One prompt of a RULER-style task.

    Attributes:
        task, length, index, seed: what was asked for; the prompt has ``len(input_ids) +
            max_new_tokens <= length`` tokens.
        input_ids: the prompt's tokens (no special tokens added beyond the chat template's).
        answers: the strings the answer must contain (scored by :func:`string_match_all`).
        max_new_tokens: tokens to generate.
        text: the prompt text.
        n_units: the haystack size (words, noise lines, distractor needles, list words, coded words).
        needles: the inserted needles with their depths (NIAH tasks).
        depth: the target needle's depth (NIAH), else None.
        needle_tokens: token index in ``input_ids`` where each needle of ``needles`` starts.
        context_tokens: ``(start, end)`` token indices of the haystack-with-needles in ``input_ids``.
    """

    task: str
    length: int
    index: int
    seed: int
    input_ids: tuple[int, ...]
    answers: tuple[str, ...]
    max_new_tokens: int
    text: str
    n_units: int
    needles: tuple[Needle, ...] = ()
    depth: float | None = None
    needle_tokens: tuple[int, ...] = ()
    context_tokens: tuple[int, int] = (0, 0)

    @property
    def needle_token_depths(self) -> tuple[float, ...]:
        """Each needle's start as a fraction of the context's tokens."""
        start, end = self.context_tokens
        return tuple((t - start) / max(1, end - start) for t in self.needle_tokens)


def _token_index(offsets: Sequence[tuple[int, int]], char: int) -> int:
    """Index of the first token ending after character ``char``."""
    lo, hi = 0, len(offsets)
    while lo < hi:
        mid = (lo + hi) // 2
        if offsets[mid][1] <= char:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _renderer(spec: TaskSpec, tokenizer: Any, key: str, length: int, depth: float | None,
              words: Sequence[str] | None) -> tuple[Callable[[int], Draft], int]:
    """(render(n) -> Draft, a first guess of n)."""
    if spec.family == "niah":
        render = _niah_renderer(spec, key, depth, words)
        per_unit = 20 if spec.param("type_haystack") != "essay" else 1.3
        return render, int(length / per_unit / 1.5)
    if spec.family == "variable_tracking":
        hops = spec.param("num_hops")
        try:  # the example gets min(500, length // 4) tokens, and at least its smallest size
            n_example = fit_units(lambda n: len(_encode(tokenizer, _vt_example(key, n, hops))), min(500, length // 4),
                                  10, minimum=hops + 1)
        except ValueError:
            n_example = hops + 1
        return _vt_renderer(spec, key, _vt_example(key, n_example, hops)), length // 30
    if spec.family == "common_words_extraction":
        return _cwe_renderer(spec, key, length), length // 20
    if spec.family == "freq_words_extraction":
        return _fwe_renderer(spec, key, length), length // 4
    raise ValueError(f"unknown task family {spec.family!r}")


def make_ruler_sample(
    tokenizer: Any,
    task: str,
    length: int,
    *,
    index: int = 0,
    seed: int = 42,
    depth: float | None = None,
    essay: str | Sequence[str] | None = None,
    use_chat: bool | None = None,
    hint: int | None = None,
) -> RulerSample:
    """Build sample ``index`` of ``task`` for a budget of ``length`` tokens (prompt + answer).

    Args:
        tokenizer: a Hugging Face tokenizer (its chat template is used when ``use_chat``).
        task: a name of :data:`TASKS`.
        length: the token budget, prompt plus ``max_new_tokens`` (RULER's ``max_seq_length``).
        index, seed: select the sample; the same arguments give the same prompt.
        depth: the NIAH target needle's depth in [0, 1]; None draws it from RULER's grid. Ignored
            by vt, cwe and fwe.
        essay: the essay haystack, as text or as :func:`essay_words` (needed by the essay tasks).
        use_chat: wrap the prompt in the chat template; default: when the tokenizer has one.
        hint: a guess of the haystack size (e.g. the previous sample's ``n_units``) to start from.

    Raises:
        ValueError: unknown task, bad depth, missing essay, or a length too short for the task.
    """
    if task not in TASKS:
        raise ValueError(f"Unknown RULER task {task!r}; choose from {', '.join(TASK_NAMES)}.")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}.")
    spec = TASKS[task]
    if use_chat is None:
        use_chat = bool(getattr(tokenizer, "chat_template", None))
    words = essay_words(essay) if isinstance(essay, str) else essay
    key = sample_seed(task, length, index, seed)
    budget = length - spec.max_new_tokens
    render, guess = _renderer(spec, tokenizer, key, length, depth if spec.family == "niah" else None, words)
    minimum = spec.param("num_hops") + 1 if spec.family == "variable_tracking" else 1

    def count(n: int) -> int:
        return len(_encode(tokenizer, wrap(tokenizer, render(n), use_chat)))

    try:
        n = fit_units(count, budget, hint if hint is not None else guess, minimum)
    except ValueError as exc:
        raise ValueError(f"length={length} is too short for RULER task {task!r}: {exc}.") from exc
    draft = render(n)
    text = wrap(tokenizer, draft, use_chat)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = tuple(encoded["input_ids"])
    offsets = [tuple(o) for o in encoded["offset_mapping"]]
    context_start = text.index(draft.context)
    base = context_start
    needle_tokens = []
    for needle in draft.needles:
        at = text.index(needle.text, base)
        needle_tokens.append(_token_index(offsets, at))
    target = next((nd.depth for nd in draft.needles if nd.is_target), None)
    return RulerSample(
        task=task, length=length, index=index, seed=seed, input_ids=ids, answers=draft.answers,
        max_new_tokens=spec.max_new_tokens, text=text, n_units=n, needles=draft.needles, depth=target,
        needle_tokens=tuple(needle_tokens),
        context_tokens=(_token_index(offsets, context_start),
                        _token_index(offsets, context_start + len(draft.context))),
    )


# ----------------------------------------------------------------------------- scoring


def postprocess_prediction(text: str) -> str:
    """RULER's cleaning of a generation: control characters -> newlines, outer whitespace stripped."""
    return re.sub(r"[\x00-\x1f]", "\n", text.strip()).strip()


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """Fraction of ``references`` contained in ``prediction``, case-insensitive (RULER's metric / 100)."""
    if not references:
        raise ValueError("no reference strings to match")
    pred = prediction.lower()
    return sum(ref.lower() in pred for ref in references) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """1.0 when any of ``references`` is in ``prediction`` (case-insensitive), else 0.0 (RULER's QA metric)."""
    pred = prediction.lower()
    return float(any(ref.lower() in pred for ref in references))


def ruler_average(scores: Sequence[float]) -> float:
    """Mean of per-task scores (fractions); NaN when empty."""
    return sum(scores) / len(scores) if scores else math.nan
