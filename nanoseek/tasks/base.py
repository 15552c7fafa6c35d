"""What every task family shares: the Problem record, the train/test split, answer extraction.

A family is a generator (seeded, with a difficulty knob) plus a verifier. The verifier is what RL trusts,
so `score` must give 0.0 rather than raise on any string, and must be fast on any string: extraction only
ever looks at the last <answer>…</answer> or at a bounded tail of the text, and the parsers behind it cap
their input (expr.py), so the cost of one call is bounded by input-length caps, not by a timer.

The train/test split is a property of the problem itself, a hash of its family and prompt, so no seed can
put the same problem on both sides: `sample_problems` simply rejects problems of the other split.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field

from nanoseek.errors import UserError
from nanoseek.tasks.expr import parse_number
from nanoseek.tasks.language import render

TEST_PER_MILLE = 100      # ~10% of all problems are test problems
MAX_TAIL_CHARS = 20_000   # answer fallbacks look only at this many trailing characters


@dataclass
class Problem:
    family: str
    prompt: str          # the user's question, plain text (chat templates are applied elsewhere)
    answer: str          # reference answer, as it should appear inside <answer>…</answer>
    solution: str        # worked step-by-step reasoning in the "en" register, ending with the answer
    difficulty: int
    meta: dict = field(default_factory=dict)

    def completion(self, register: str = "en") -> str:
        """The ideal response (R1 template): reasoning inside <think>, the answer inside <answer>."""
        return f"<think>\n{render(self.solution, register)}\n</think>\n<answer>{self.answer}</answer>"

    @property
    def split(self) -> str:
        return split_of(self.family, self.prompt)


def split_of(family: str, prompt: str) -> str:
    """"train" or "test", from a stable hash of the problem's canonical text (not Python's salted hash)."""
    digest = hashlib.blake2b(f"{family}\n{prompt}".encode("utf-8"), digest_size=8).digest()
    return "test" if int.from_bytes(digest, "big") % 1000 < TEST_PER_MILLE else "train"


def answer_span(text: str) -> str | None:
    """Contents of the last complete <answer>…</answer>, or None."""
    end = text.rfind("</answer>")
    start = text.rfind("<answer>", 0, end) if end >= 0 else -1
    return text[start + len("<answer>"):end] if start >= 0 else None


# A number not glued to a word, a decimal point or a closing bracket before it ("7-3" ends in "3", "x=-6"
# in "-6"); thousands separators only in groups of three. Linear time: no nested quantifiers.
_LAST_NUMBER = re.compile(r"(?<![\w.)])-?\d+(?:,\d{3})*(?:\.\d+)?")


def last_number(text: str) -> str | None:
    match = None
    for match in _LAST_NUMBER.finditer(text[-MAX_TAIL_CHARS:]):
        pass
    return match.group(0) if match else None


class TaskFamily:
    """A seeded generator with a difficulty knob and a verifier that never raises."""

    name: str
    difficulties: range           # valid difficulty levels
    default_difficulties: range   # levels `sample_problems` draws from when no difficulty is given

    def generate(self, rng: random.Random, difficulty: int) -> Problem:
        raise NotImplementedError

    def check(self, problem: Problem, answer: str) -> bool:
        """Is the extracted answer correct? Here: equal as exact numbers. May raise; `score` gives 0 then."""
        value = parse_number(answer)
        return value is not None and value == parse_number(problem.answer)

    def extract_answer(self, completion: str) -> str | None:
        """The last number of the last <answer>…</answer>, else of the completion's tail."""
        span = answer_span(completion)
        return last_number(completion if span is None else span)

    def score(self, problem: Problem, completion: str) -> float:
        try:
            answer = self.extract_answer(completion)
            return 1.0 if answer is not None and self.check(problem, answer) else 0.0
        except Exception:  # the verifier's contract: any string scores, nothing raises
            return 0.0

    def check_difficulty(self, difficulty: int) -> None:
        if difficulty not in self.difficulties:
            lo, hi = self.difficulties[0], self.difficulties[-1]
            raise UserError(f"{self.name} difficulty {difficulty} is out of range; use {lo}..{hi}")
