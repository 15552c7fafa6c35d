"""What every task family shares: the Problem record, the train/test split, answer extraction.

A family is a generator (seeded, with a difficulty knob) plus a verifier. The verifier is what RL trusts,
so `score` must give 0.0 rather than raise on any string, and must be fast on any string: extraction only
ever looks at the last <answer>…</answer> or at a bounded tail of the text, and the parsers behind it cap
their input (expr.py), so the cost of one call is bounded by input-length caps, not by a timer.

Accuracy needs the answer in the required format (R1 report §2.2.2: the model "is required to provide the
final answer in a specified format"). The final answer is read only after the reasoning (after the last
</think>; a <think> never closed holds no answer) and only from the `answer_format`:
  "answer_tag"  the last <answer>…</answer> (the R1-Zero template, and our chat format)
  "boxed"       the last \\boxed{…}                     (MATH-style user data under the chat template)
  "gsm8k"       the rest of the line after the last "####" (GSM8K's own style)
A completion without it scores 0, however right its last number. `fallback=True` (opt-in, "lenient") then
reads the family's fallback instead: the last number of the text's tail (a Countdown: the last arithmetic
run), which also credits truncated reasoning and answers that only appear inside <think>.

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


def last_boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...} (or \\fbox{...}) with balanced braces, or None."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    open_ = text.find("{", start, start + 8)
    if open_ < 0:
        return None
    depth = 0
    for i in range(open_, min(len(text), open_ + MAX_TAIL_CHARS)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[open_ + 1:i]
    return None


def _after_hashes(text: str) -> str | None:
    """GSM8K's final answer: the rest of the line after the last "####", or None."""
    start = text.rfind("####")
    return text[start + 4:].split("\n", 1)[0] if start >= 0 else None


# The one definition of the final-answer formats (RewardConfig.answer_format names one of them).
ANSWER_FORMATS = {"answer_tag": answer_span, "boxed": last_boxed, "gsm8k": _after_hashes}


def after_reasoning(text: str) -> str | None:
    """The text after the chain of thought: after the last </think>; all of it when there is no <think>;
    None when a <think> is never closed (the answer would be inside the reasoning, or truncated)."""
    end = text.rfind("</think>")
    if end >= 0:
        return text[end + len("</think>"):]
    return None if "<think>" in text else text


def final_answer_text(completion: str, answer_format: str = "answer_tag") -> str | None:
    """The final answer as written in `answer_format` after the reasoning, or None (see the module doc)."""
    tail = after_reasoning(completion)
    return None if tail is None else ANSWER_FORMATS[answer_format](tail)


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

    def worked_solution(self, problem: Problem, rng: random.Random, check: bool, slip: bool) -> str:
        """The worked solution, written with a check of each step (`check`) and, with `slip`, one step first
        written wrong, caught by its check and redone ("Wait, redo ..."): the self-verification the corpus
        shows now and then. Families that do not write checks return `problem.solution`."""
        return problem.solution

    def check(self, problem: Problem, answer: str) -> bool:
        """Is the extracted answer correct? Here: equal as exact numbers. May raise; `score` gives 0 then."""
        value = parse_number(answer)
        return value is not None and value == parse_number(problem.answer)

    def extract_answer(self, completion: str, answer_format: str = "answer_tag", fallback: bool = False) -> str | None:
        """The answer read from the final answer in `answer_format`; without one, None, or with `fallback`
        (lenient, opt-in) the family's guess from the whole completion."""
        span = final_answer_text(completion, answer_format)
        if span is not None:
            return self.answer_in(span)
        return self.fallback_answer(completion) if fallback else None

    def answer_in(self, span: str) -> str | None:
        """The answer inside a final-answer span: here its last number ("x = 12" -> "12")."""
        return last_number(span)

    def fallback_answer(self, completion: str) -> str | None:
        """The lenient guess when no final answer is written: here the last number of the tail."""
        return last_number(completion)

    def same_answer(self, problem: Problem, a: str, b: str) -> bool:
        """Do two extracted answers say the same? (cons@K votes over these groups.) Here: equal as exact
        numbers ("1,000" = "1000" = "1000.0"), else equal text up to blanks. Never raises."""
        x, y = parse_number(a), parse_number(b)
        if x is not None and y is not None:
            return x == y
        return "".join(a.split()) == "".join(b.split())

    def prepare(self, problems: list[Problem], completions: list[str]) -> None:
        """Told of a batch before `score` is asked about each of its (problem, completion) pairs: a family whose
        verifier is a model scores them in one forward here. Rule verifiers need nothing."""

    def score(self, problem: Problem, completion: str, answer_format: str = "answer_tag",
              fallback: bool = False) -> float:
        try:
            answer = self.extract_answer(completion, answer_format, fallback)
            return 1.0 if answer is not None and self.check(problem, answer) else 0.0
        except Exception:  # the verifier's contract: any string scores, nothing raises
            return 0.0

    def check_difficulty(self, difficulty: int) -> None:
        if difficulty not in self.difficulties:
            lo, hi = self.difficulties[0], self.difficulties[-1]
            raise UserError(f"{self.name} difficulty {difficulty} is out of range; use {lo}..{hi}")
