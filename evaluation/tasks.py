"""Long-context probes generated offline: needles in a haystack of real prose (RULER-style
single-key passkeys, one-word values, multi-key and multi-value needles, and variable tracking)
and open-ended generations (scored by agreement with full attention, not by answers), as token
ids.

Each probe is a haystack prefix whose length is a multiple of ALIGN tokens, followed by a short
question. The prefix is policy-independent (prefill is exact) and is reused from vLLM's prefix
cache across policies; the question is shorter than a KV block, so it is never cached and can be
recomputed through the decode path ("question through decode" protocol).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from itertools import pairwise

ALIGN = 128  # vLLM's CPU KV block size; also a multiple of the GPU block sizes
TASKS = ("niah_single", "niah_word", "niah_multikey", "niah_multivalue", "variable_tracking", "generation")
GENERATION_TOKENS = 64  # an open-ended continuation, compared token by token with full attention
VALUE_WORDS = (
    "bramble",
    "quartz",
    "juniper",
    "mosaic",
    "thistle",
    "obsidian",
    "tangerine",
    "zephyr",
    "nutmeg",
    "sapphire",
    "pelican",
    "lavender",
    "cobalt",
    "mandolin",
    "paprika",
    "hazelnut",
)
WORDS = (
    "apple",
    "river",
    "lantern",
    "meadow",
    "copper",
    "falcon",
    "harbor",
    "violet",
    "summit",
    "cactus",
    "glacier",
    "orchid",
    "pepper",
    "walnut",
    "comet",
    "saddle",
    "marble",
    "tundra",
)


@dataclass
class Probe:
    task: str
    index: int
    context: int  # total prompt tokens (prefix + question)
    depth: float  # relative position of the (first) needle
    prefix_ids: list[int]
    question_ids: list[int]
    answers: list[str]  # all must appear in the output (exact-match scoring)
    needle_spans: list[tuple[int, int]]  # token positions of the needles' answer values
    max_tokens: int

    @property
    def prompt_ids(self) -> list[int]:
        return self.prefix_ids + self.question_ids

    def meta(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("prefix_ids", "question_ids")}


def score(output: str, answers: list[str]) -> bool:
    """RULER's string match: every expected answer appears in the output."""
    return all(answer in output for answer in answers)


def _needles(task: str, rng: random.Random) -> tuple[list[tuple[str, str]], str, list[str], int]:
    """(needles as (text, value-in-text), question with answer cue, answers, max_tokens)."""
    number = lambda: str(rng.randrange(1_000_000, 10_000_000))
    if task == "niah_single":
        key = str(rng.randrange(10_000, 100_000))
        return (
            [(f"The pass key is {key}. Remember it. {key} is the pass key.", key)],
            "What is the pass key? The pass key is",
            [key],
            8,
        )
    if task == "niah_word":  # a one-word value: no digits for the model to copy by pattern
        word = rng.choice(VALUE_WORDS)
        return (
            [(f"The secret word is {word}. Remember it. {word} is the secret word.", word)],
            "What is the secret word? The secret word is",
            [word],
            8,
        )
    if task == "generation":  # no needle: the answer is full attention's own continuation
        return [], "Continue the text above in the same style:", [], GENERATION_TOKENS
    if task == "niah_multikey":
        keys = rng.sample(WORDS, 4)
        values = [number() for _ in keys]
        target = rng.randrange(len(keys))
        return (
            [(f"The special magic number for {k} is: {v}.", v) for k, v in zip(keys, values)],
            f"What is the special magic number for {keys[target]}? "
            f"The special magic number for {keys[target]} is:",
            [values[target]],
            10,
        )
    if task == "niah_multivalue":
        key = rng.choice(WORDS)
        values = [number() for _ in range(3)]
        return (
            [(f"The special magic number for {key} is: {v}.", v) for v in values],
            f"What are all the special magic numbers for {key}? The special magic numbers for {key} are:",
            values,
            32,
        )
    if task == "variable_tracking":
        names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(4)]
        value = str(rng.randrange(10_000, 100_000))
        chain = [(f"VAR {names[0]} = {value}.", names[0])]
        chain += [(f"VAR {b} = VAR {a}.", b) for a, b in pairwise(names)]
        return (
            chain,
            f"Find all variables that are assigned the value {value}. "
            f"Answer: the variables assigned the value {value} are",
            names,
            24,
        )
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")


def make_probe(
    tokenizer, haystack: str, task: str, context: int, depth: float, index: int, seed: int = 0
) -> Probe:
    """One probe of about `context` tokens: needles spread from relative `depth` on (several
    needles are spaced over the rest of the haystack), question at the end."""
    rng = random.Random(f"{seed}-{task}-{context}-{depth}-{index}")
    needles, question, answers, max_tokens = _needles(task, rng)
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)
    head = encode(
        "There is important information hidden inside a lot of irrelevant text. Find it and memorize it.\n\n"
    )
    question_ids = encode("\n\n" + question)
    needle_ids = [encode("\n" + text + "\n") for text, _ in needles]
    prefix_len = (context - len(question_ids)) // ALIGN * ALIGN
    budget = prefix_len - len(head) - sum(map(len, needle_ids))
    words = haystack.split(" ")
    start = rng.randrange(len(words) // 2)  # a different stretch of prose per probe
    filler = encode(" ".join(words[start : start + budget * 2]))[:budget]
    if len(filler) < budget:
        raise ValueError(f"haystack too short for {context} tokens")
    # needle i goes at depth + i * (1 - depth) / n of the filler
    cuts = [int(budget * (depth + i * (1 - depth) / len(needles))) for i in range(len(needles))]
    ids, spans, last = list(head), [], 0
    for cut, needle, (_, value) in zip(cuts, needle_ids, needles):
        ids += filler[last:cut]
        spans.append(_value_span(tokenizer, needle, value, len(ids)))
        ids += needle
        last = cut
    ids += filler[last:]
    assert len(ids) == prefix_len, (len(ids), prefix_len)
    return Probe(
        task, index, prefix_len + len(question_ids), depth, ids, question_ids, answers, spans, max_tokens
    )


def _value_span(tokenizer, needle: list[int], value: str, offset: int) -> tuple[int, int]:
    """Token positions [start, end) within the prompt of the smallest needle slice holding `value`."""
    for length in range(1, len(needle) + 1):
        for start in range(len(needle) - length + 1):
            if value in tokenizer.decode(needle[start : start + length]):
                return offset + start, offset + start + length
    raise ValueError(f"{value!r} not in needle")


def make_probes(
    tokenizer, haystack: str, tasks: list[str], contexts: list[int], depths: list[float], seed: int = 0
) -> list[Probe]:
    return [
        make_probe(tokenizer, haystack, task, context, depth, i, seed)
        for task in tasks
        for context in contexts
        for i, depth in enumerate(depths)
    ]
