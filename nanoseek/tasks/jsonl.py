"""User data as Problems: GSM8K ("#### 42"), MATH ("\\boxed{...}") and plain question/answer JSONL.

One JSON object per line with the question under `question`, `prompt` or `problem`, and the answer as
GSM8K writes it (`answer` ending in "#### 42"; the text before it becomes the solution, calculator
annotations `<<6*3=18>>` removed), as MATH writes it (`\\boxed{...}` in `solution` or `answer`), or plain
(`answer`: "42" or 42). A bad line is a UserError naming file:line.

Answers are compared as exact numbers when both sides are plain numbers (fast, and all of GSM8K), else with
math-verify (`parse` + `verify`: LaTeX, fractions, sets, matrices...). math-verify parses with ANTLR and
sympy, which can take seconds on a short nested string and forever on `9^{9^{9}}`, and its own timeout is a
SIGALRM that only works in the main thread. So a prediction reaches it only after `_tame` bounds its length,
bracket depth and exponents; the SIGALRM timeout is a second net where it can run.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from pathlib import Path

from nanoseek.errors import UserError
from nanoseek.files import iter_jsonl
from nanoseek.tasks.base import MAX_TAIL_CHARS, Problem, TaskFamily, last_boxed, last_number
from nanoseek.tasks.expr import parse_number

MAX_CANDIDATE_CHARS = 300  # longest prediction handed to math-verify (and shorter if the gold is short)
MAX_DEPTH = 4              # deepest bracket nesting handed to math-verify (ANTLR slows ~0.1 s per level)
TIMEOUT_S = 2              # math-verify's own SIGALRM timeout, main thread only

logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns (with the whole input) on each timeout

_CALCULATOR = re.compile(r"<<[^<>]*>>")


def _problem(obj, where: str) -> Problem:
    """One parsed JSONL record as a Problem; `where` = file:line for the errors."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object with 'question' and 'answer', got {type(obj).__name__}")
    question = next((obj[k] for k in ("question", "prompt", "problem") if isinstance(obj.get(k), str)), "")
    if not question.strip():
        raise UserError(f"{where}: no question; put the problem text under 'question' (or 'prompt'/'problem')")
    answer, solution = obj.get("answer"), obj.get("solution")
    answer = str(answer) if isinstance(answer, (int, float)) and not isinstance(answer, bool) else answer
    answer = answer if isinstance(answer, str) and answer.strip() else None
    solution = solution if isinstance(solution, str) else ""
    if answer is not None and "####" in answer:
        reasoning, _, gold = answer.rpartition("####")
        family, solution = "gsm8k", _CALCULATOR.sub("", reasoning).strip()
    elif answer is not None:
        gold = last_boxed(answer) or answer
        family = "math" if "\\boxed" in answer or "\\boxed" in solution else "jsonl"
    else:
        gold, family = last_boxed(solution), "math"
    gold = (gold or "").strip()
    if not gold:
        raise UserError(f"{where}: no answer; give 'answer' (\"#### 42\" as GSM8K, or plain) or a 'solution' "
                        "with \\boxed{...}")
    level = re.search(r"\d+", str(obj.get("level", "")))
    # the whole record rides along: user reward functions get its columns (sampling.rewards.problem_columns)
    meta = {"source": where, **{k: obj[k] for k in ("subject", "type") if k in obj}, "record": obj}
    return Problem(family, question.strip(), gold, solution, int(level.group(0)) if level else 0, meta)


def load_jsonl_problems(path: str | Path) -> list[Problem]:
    """Every line of a GSM8K / MATH / question-answer JSONL file as a Problem (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file; give a JSONL file with one question/answer object per line")
    problems = [_problem(obj, f"{path}:{lineno}") for lineno, obj in iter_jsonl(path)]   # strict UTF-8 JSON lines
    if not problems:
        raise UserError(f"{path} is empty; it needs one JSON object per line with 'question' and 'answer'")
    return problems


def _bracket_depth(text: str) -> int:
    depth = deepest = 0
    for c in text:
        depth += 1 if c in "([{" else -1 if c in ")]}" else 0
        deepest = max(deepest, depth)
    return deepest


_TOWER = re.compile(r"\^\s*[{(][^})]*\^|\^\s*\{[^}]*\}\s*\^|\^\s*\d+\s*\^|\*\*|!")
_BIG_EXPONENT = re.compile(r"\^\s*[{(]?\s*[-+]?\d{2,}")
_HUGE_EXPONENT = re.compile(r"\^\s*[{(]?\s*[-+]?\d{4,}")
_COMBINATORICS = re.compile(r"\\[dt]?binom|\\choose|\\frac\s*\{\s*\d+\s*!")


def _tame(pred: str, gold: str) -> bool:
    """Is `pred` small enough for math-verify to be quick? Length, nesting, no towers (`9^(9^9)`), factorials,
    exponents of 4+ digits, binomials of 4-digit arguments or nested exponentials (`\\exp(\\exp(99))`).
    These checks are the only bound that holds in every thread: sympy evaluating 9^387420489 holds the GIL,
    so no timeout (SIGALRM or a watchdog thread) could interrupt it."""
    return (len(pred) <= min(MAX_CANDIDATE_CHARS, max(40, 4 * len(gold)))
            and _bracket_depth(pred) <= MAX_DEPTH
            and pred.count("^") <= 3
            and not _TOWER.search(pred)
            and len(_BIG_EXPONENT.findall(pred)) <= 1
            and not _HUGE_EXPONENT.search(pred)
            and not (_COMBINATORICS.search(pred) and re.search(r"\d{4,}", pred))
            and pred.count("\\exp") + pred.count("e^") <= 1
            and not re.search(r"\d{31}", pred))


@functools.lru_cache(maxsize=8192)
def _parse_gold(gold: str, timeout: int | None):
    from math_verify import parse

    return parse(f"${gold}$", parsing_timeout=timeout)


def math_verify_equal(gold: str, pred: str) -> bool:
    """math-verify's judgement of pred == gold, False on anything it cannot do quickly."""
    if not _tame(pred, gold):
        return False
    from math_verify import parse, verify

    timeout = TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    try:
        g = _parse_gold(gold, timeout)
        p = parse(f"${pred}$", parsing_timeout=timeout)
        return bool(g and p and verify(g, p, timeout_seconds=timeout))
    except Exception:
        return False


def answers_match(gold: str, pred: str) -> bool:
    """Exact numbers; a number gold against a non-LaTeX prediction: its last number; math-verify; equal text."""
    g, p = parse_number(gold), parse_number(pred)
    if g is not None and p is not None:
        return g == p
    if g is not None and "\\" not in pred and "^" not in pred:  # a number in words: no LaTeX to parse
        return parse_number(last_number(pred) or "") == g
    if math_verify_equal(gold, pred):
        return True
    return "".join(gold.split()) == "".join(pred.split())


class MathVerify(TaskFamily):
    """Scores loaded GSM8K / MATH / plain problems; there is nothing to generate."""

    name = "math"
    difficulties = range(0, 6)
    default_difficulties = range(0, 6)

    def generate(self, rng, difficulty):
        raise UserError("gsm8k/math problems come from data files: use nanoseek.tasks.jsonl.load_jsonl_problems")

    def answer_in(self, span: str) -> str | None:
        """The final answer, unboxed if it holds \\boxed{} (<answer>$\\boxed{7}$</answer>), "$" stripped."""
        boxed = last_boxed(span[-MAX_TAIL_CHARS:])
        return _candidate(boxed if boxed is not None else span)

    def fallback_answer(self, completion: str) -> str | None:
        """Lenient: the last \\boxed{} anywhere, else the last number."""
        boxed = last_boxed(completion[-MAX_TAIL_CHARS:])
        return _candidate(boxed if boxed is not None else last_number(completion))

    def check(self, problem: Problem, answer: str) -> bool:
        return answers_match(problem.answer, answer)

    def same_answer(self, problem: Problem, a: str, b: str) -> bool:
        """math-verify's equivalence (the verifier's own rule), `a` read as the reference."""
        try:
            return answers_match(a, b)
        except Exception:
            return False


def _candidate(text: str | None) -> str | None:
    """`text` stripped of blanks and "$", if non-empty and short enough for math-verify."""
    candidate = text.strip().strip("$").strip() if text else ""
    return candidate if 0 < len(candidate) <= MAX_CANDIDATE_CHARS else None


MATH_FAMILY = MathVerify()
