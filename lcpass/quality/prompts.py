"""Synthetic long-context prompts built token-exactly from a tokenizer (or from random tokens).

Three kinds, all returned as a `Prompt` (token ids + where the facts sit + the expected answer):

- `passkey_prompt`: a 5-digit pass key stated ONCE inside repeated filler text, asked at the end.
- `multi_needle_prompt`: several linked facts ("the code of the red door is 48213", "the code of the blue
  door is the same as the code of the red door", ...) scattered through the filler; the question asks for
  the last door of the chain, so the answer needs following every link.
- `copy_prompt`: a needle of random words (or random tokens) and a request to repeat it, with the answer
  appended (teacher forcing); used by retrieval-head scoring and by DuoAttention's gate training.

Lengths are exact in tokens: pieces are tokenized once and the filler stream is cut to fill the rest.

Example:
    >>> p = passkey_prompt(tok, length=1024, depth=0.4, seed=0)
    >>> len(p.ids), p.answer                     # doctest: +SKIP
    (1024, '71432')
    >>> parse_number(" 71432. The grass is green") == p.answer
    True
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "Prompt",
    "FILLER",
    "PASSKEY_QUESTION",
    "passkey_prompt",
    "multi_needle_prompt",
    "copy_prompt",
    "random_copy_prompt",
    "parse_number",
    "encode",
]

FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
HEADER = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it."
)
WORDS = (
    "apple river candle mountain violet copper lantern meadow harbor pencil falcon marble orchid "
    "thunder velvet glacier saddle compass ember willow crystal barrel tiger anchor cobalt maple "
    "spider rocket garden walnut silver castle dolphin feather hammer island jungle ladder mirror "
    "needle oyster pepper quartz ribbon shadow tulip umbrella valley wagon yellow zebra bottle"
).split()
# "Answer with the 5-digit number" matters for a 135M model: with a bare "The pass key is" SmolLM2
# sometimes explains what a pass key is instead of giving it (seen at 1k tokens).
PASSKEY_QUESTION = "\nWhat is the pass key? Answer with the 5-digit number.\nAnswer: The pass key is"
COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black", "brown", "gray")


@dataclass
class Prompt:
    """A token-exact synthetic prompt.

    Attributes:
        ids: [1, length] int64 token ids (the prompt; for copy prompts the answer is included at the end).
        answer: the expected answer text (passkey / chain end) or the copied needle text.
        spans: (start, end) token ranges of each stated fact (the passkey sentence, each chain link).
        depth: the requested depth (0 = start of the filler, 1 = end).
        answer_span: for teacher-forced prompts, the token range of the answer inside `ids`.
        meta: anything else the builder chose (digits, chain order, ...).
    """

    ids: torch.Tensor
    answer: str
    spans: list[tuple[int, int]] = field(default_factory=list)
    depth: float = 0.0
    answer_span: tuple[int, int] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        """Number of tokens in `ids`."""
        return int(self.ids.shape[-1])


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` without special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def parse_number(text: str, digits: int = 5) -> str | None:
    """The first run of exactly `digits` digits in `text`, or None.

    Example:
        >>> parse_number("The pass key is 71432.")
        '71432'
        >>> parse_number("no number here") is None
        True
    """
    m = re.search(rf"(?<!\d)\d{{{digits}}}(?!\d)", text)
    return m.group(0) if m else None


def _check_depth(depth: float) -> None:
    if not 0.0 <= float(depth) <= 1.0:
        raise ValueError(f"depth={depth!r} must lie in [0, 1] (0 = start of the filler, 1 = its end)")


def _filler(tokenizer: Any, n: int) -> tuple[list[int], list[int]]:
    """`n` filler tokens and the positions right after each sentence end ('.' tokens)."""
    unit = encode(tokenizer, FILLER)
    reps = n // len(unit) + 1
    ids = (unit * reps)[:n]
    dot = set(encode(tokenizer, "."))
    ends = [0] + [i + 1 for i, t in enumerate(ids) if t in dot]
    return ids, ends


def _snap(ends: list[int], target: int) -> int:
    """The sentence boundary closest to `target` (keeps facts from splitting a filler sentence)."""
    return min(ends, key=lambda e: abs(e - target))


def _assemble(
    tokenizer: Any, length: int, facts: list[tuple[float, str]], question: str, what: str
) -> tuple[list[int], list[tuple[int, int]]]:
    """header + filler with `facts` (depth, text) inserted at their depths + question, exactly `length` ids.

    Returns the ids and each fact's (start, end) token span, in the order of `facts`.
    """
    head = encode(tokenizer, HEADER)
    q = encode(tokenizer, question)
    fact_ids = [encode(tokenizer, " " + text.strip()) for _, text in facts]
    n_fill = length - len(head) - len(q) - sum(len(f) for f in fact_ids)
    if n_fill < 0:
        need = length - n_fill
        raise ValueError(
            f"{what}: length={length} tokens is too short for the header, facts and question "
            f"({need} tokens); ask for length >= {need + 16}"
        )
    fill, ends = _filler(tokenizer, n_fill)
    order = sorted(range(len(facts)), key=lambda i: facts[i][0])
    cuts = {i: _snap(ends, round(facts[i][0] * n_fill)) for i in order}
    ids: list[int] = list(head)
    spans: list[tuple[int, int]] = [(0, 0)] * len(facts)
    pos = 0
    for i in order:
        cut = max(cuts[i], pos)
        ids += fill[pos:cut]
        pos = cut
        spans[i] = (len(ids), len(ids) + len(fact_ids[i]))
        ids += fact_ids[i]
    ids += fill[pos:]
    ids += q
    assert len(ids) == length, (len(ids), length)
    return ids, spans


def passkey_prompt(tokenizer: Any, length: int, depth: float, seed: int = 0) -> Prompt:
    """A pass key (5 digits) stated once at `depth` of the filler; the prompt ends with the question.

    The model's continuation should start with the key; `parse_number` reads it back.

    Example:
        >>> p = passkey_prompt(tok, 1024, 0.5, seed=3)      # doctest: +SKIP
        >>> tok.decode(p.ids[0, p.spans[0][0]:p.spans[0][1]])  # doctest: +SKIP
        ' The pass key is 52117. Remember it.'
    """
    _check_depth(depth)
    key = str(random.Random(seed).randint(10000, 99999))
    fact = f"The pass key is {key}. Remember it."
    ids, spans = _assemble(tokenizer, length, [(depth, fact)], PASSKEY_QUESTION, "passkey_prompt")
    return Prompt(torch.tensor([ids]), key, spans, float(depth), meta={"fact": fact})


def multi_needle_prompt(
    tokenizer: Any,
    length: int,
    hops: int = 1,
    distractors: int = 1,
    seed: int = 0,
    depths: tuple[float, ...] | None = None,
) -> Prompt:
    """Linked facts: one door's code, then `hops` doors that share the previous door's code, plus
    `distractors` doors with codes of their own.

    The question asks for the code of the chain's last door: the only number that answers it is the
    chain root's code, reachable only by following every link (the distractor codes are wrong answers).
    Facts sit at `depths` (default: spread over [0.1, 0.9] in a shuffled order, so the reading order
    differs from the chain order); `spans` follow the order chain root, links..., distractors.

    Example:
        >>> p = multi_needle_prompt(tok, 2048, hops=2, seed=1)  # doctest: +SKIP
        >>> p.meta["chain"]                                   # doctest: +SKIP
        ['purple', 'red', 'gray']
    """
    n_doors = hops + 1 + distractors
    if hops < 1 or distractors < 0 or n_doors > len(COLORS):
        raise ValueError(
            f"hops={hops}, distractors={distractors}: need hops >= 1, distractors >= 0 and "
            f"hops + 1 + distractors <= {len(COLORS)} doors"
        )
    rng = random.Random(seed)
    doors = rng.sample(COLORS, n_doors)
    chain, others = doors[: hops + 1], doors[hops + 1 :]
    codes = rng.sample(range(10000, 100000), 1 + distractors)
    code = str(codes[0])
    facts = [f"The code of the {chain[0]} door is {code}."]
    for prev, cur in zip(chain, chain[1:]):
        facts.append(f"The {cur} door has the same code as the {prev} door.")
    for door, other in zip(others, codes[1:]):
        facts.append(f"The code of the {door} door is {other}.")
    if depths is None:
        slots = [0.1 + 0.8 * i / max(len(facts) - 1, 1) for i in range(len(facts))]
        rng.shuffle(slots)
        depths = tuple(slots)
    if len(depths) != len(facts):
        raise ValueError(f"multi_needle_prompt: {len(depths)} depths for {len(facts)} facts; give one per fact")
    for d in depths:
        _check_depth(d)
    last = chain[-1]
    question = (
        f"\nQuestion: What is the code of the {last} door? Answer with a 5-digit number.\n"
        f"Answer: The code of the {last} door is"
    )
    ids, spans = _assemble(tokenizer, length, list(zip(depths, facts)), question, "multi_needle_prompt")
    return Prompt(
        torch.tensor([ids]), code, spans, float(depths[0]),
        meta={"chain": chain, "distractors": others, "facts": facts, "depths": list(depths),
              "wrong_codes": [str(c) for c in codes[1:]]},
    )


def copy_prompt(tokenizer: Any, length: int, depth: float, n_words: int = 8, seed: int = 0) -> Prompt:
    """Random words stated once at `depth`; the prompt ends with a request to repeat them AND the answer.

    `answer_span` is the token range of the repeated words at the end (teacher forcing): at position
    t - 1 of that range the model should copy token t from the needle (`spans[0]`).
    """
    _check_depth(depth)
    rng = random.Random(seed)
    words = " ".join(rng.sample(WORDS, n_words))
    fact = f"The secret words are: {words}."
    question = "\nWhat are the secret words? The secret words are:"
    answer = encode(tokenizer, " " + words + ".")
    ids, spans = _assemble(
        tokenizer, length - len(answer), [(depth, fact)], question, "copy_prompt"
    )
    start = len(ids)
    ids += answer
    return Prompt(
        torch.tensor([ids]), words, spans, float(depth), answer_span=(start, len(ids)), meta={"fact": fact}
    )


def random_copy_prompt(
    vocab_size: int, length: int, depth: float, n_tokens: int = 16, seed: int = 0
) -> Prompt:
    """Tokenizer-free copy prompt: random tokens, a random needle at `depth`, and at the end the needle's
    first two tokens followed by the rest of it (an induction / copy task on pure token ids)."""
    _check_depth(depth)
    if length < 2 * n_tokens + 8:
        raise ValueError(f"random_copy_prompt: length={length} < {2 * n_tokens + 8}; use a longer prompt")
    gen = torch.Generator().manual_seed(seed)
    needle = torch.randint(0, vocab_size, (n_tokens,), generator=gen)
    n_hay = length - 2 * n_tokens
    hay = torch.randint(0, vocab_size, (n_hay,), generator=gen)
    cut = round(depth * n_hay)
    ids = torch.cat([hay[:cut], needle, hay[cut:], needle])
    start = cut
    return Prompt(
        ids[None], " ".join(map(str, needle.tolist())), [(start, start + n_tokens)], float(depth),
        answer_span=(length - n_tokens + 2, length), meta={"random": True},
    )
