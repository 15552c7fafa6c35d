"""Countdown: reach a target from given numbers with + - * /, each number used at most once.

The task of TinyZero and "Stream of Search": easy to verify, hard to guess, and it rewards searching.
Every problem is solvable by construction — the target is the value of a random expression over all the
numbers (integer intermediates only). The worked solution is a short greedy depth-first search written out
("try 50 + 25 = 75, left 3 7 75"), dead ends included, falling back to the construction when the search
budget runs out; the reference answer is the expression found. Answers are checked with the safe parser
in expr.py: the value must equal the target and the literals must be a sub-multiset of the numbers.
Difficulty is how many numbers are given.
"""

from __future__ import annotations

import random
import re
from collections import Counter

from nanoseek.tasks.base import MAX_TAIL_CHARS, Problem, TaskFamily
from nanoseek.tasks.expr import ExprError, evaluate, parse_number

MAX_TARGET = 999        # targets lie in 1..MAX_TARGET and are not one of the numbers
MAX_VALUE = 10_000      # bound on intermediate values (generation and search)
SEARCH_LINES = 12       # search budget: "try" lines written before falling back to the construction
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}

Item = tuple[int, str, int]  # (value, expression text, precedence of its top operator; 3 = a literal)


def _combine(x: Item, op: str, y: Item) -> Item:
    """x op y with only the parentheses precedence needs."""
    p = _PREC[op]
    left = f"({x[1]})" if x[2] < p else x[1]
    right = f"({y[1]})" if y[2] < p or (y[2] == p and op in "-/") else y[1]
    value = {"+": x[0] + y[0], "-": x[0] - y[0], "*": x[0] * y[0], "/": x[0] // max(y[0], 1)}[op]
    return value, f"{left} {op} {right}", p


def _moves(pool: list[Item]) -> list[tuple[int, int, str]]:
    """(i, j, op) with pool[i] the larger operand; only moves giving a new positive integer <= MAX_VALUE."""
    out = []
    for i in range(len(pool)):
        for j in range(len(pool)):
            a, b = pool[i][0], pool[j][0]
            if i == j or a < b or (a == b and i > j):
                continue
            for op, value in (("+", a + b), ("-", a - b), ("*", a * b), ("/", a // b if a % b == 0 else 0)):
                if 0 < value <= MAX_VALUE and value not in (a, b):
                    out.append((i, j, op))
    return out


def _apply(pool: list[Item], i: int, j: int, op: str) -> tuple[Item, list[Item]]:
    new = _combine(pool[i], op, pool[j])
    return new, [it for k, it in enumerate(pool) if k not in (i, j)] + [new]


def _line(pool: list[Item], i: int, j: int, op: str, rest: list[Item], target: int) -> str:
    line = f"try {pool[i][0]} {op} {pool[j][0]} = {rest[-1][0]}, left {' '.join(str(v) for v, _, _ in rest)}"
    if rest[-1][0] == target:
        return line + f", that is {target}"
    return line + (", no" if len(rest) == 1 else "")


def _search(numbers: list[int], target: int) -> tuple[str, list[str]] | None:
    """Greedy DFS (closest value to the target first) within SEARCH_LINES; (expression, trace) or None."""
    lines: list[str] = []

    def dfs(pool: list[Item]) -> str | None:
        moves = sorted(_moves(pool), key=lambda m: abs(_apply(pool, *m)[0][0] - target))
        for i, j, op in moves:
            if len(lines) >= SEARCH_LINES:
                return None
            new, rest = _apply(pool, i, j, op)
            lines.append(_line(pool, i, j, op, rest, target))
            if new[0] == target:
                return new[1]
            if len(rest) > 1 and (found := dfs(rest)):
                return found
        return None

    found = dfs([(n, str(n), 3) for n in numbers])
    return (found, lines) if found else None


def _construct(rng: random.Random, numbers: list[int]) -> tuple[Item, list[tuple]]:
    """Combine random pairs with random valid operations until one value is left; the steps taken."""
    pool, steps = [(n, str(n), 3) for n in numbers], []
    while len(pool) > 1:
        moves = _moves(pool)
        if not moves:
            return (0, "", 3), steps
        i, j, op = rng.choice(moves)
        new, rest = _apply(pool, i, j, op)
        steps.append((pool, i, j, op, rest))
        pool = rest
    return pool[0], steps


class Countdown(TaskFamily):
    name = "countdown"
    difficulties = range(2, 7)
    default_difficulties = range(3, 5)

    def generate(self, rng: random.Random, difficulty: int) -> Problem:
        self.check_difficulty(difficulty)
        while True:
            numbers = [rng.randint(1, 20) for _ in range(difficulty)]
            if rng.random() < 0.25:
                numbers[rng.randrange(difficulty)] = rng.choice([25, 50, 75, 100])
            (target, expression, _), built = _construct(rng, numbers)
            if 1 <= target <= MAX_TARGET and target not in numbers:
                break
        head = f"Numbers {' '.join(map(str, numbers))}, target {target}."
        searched = _search(numbers, target)
        if searched:
            expression, lines = searched
        else:
            lines = [_line(*step, target) for step in built]
        solution = "\n".join([head, *lines, f"So {expression} = {target}."])
        prompt = (f"Make {target} from the numbers {', '.join(map(str, numbers))}. "
                  "Use + - * / and parentheses, and each number at most once.")
        return Problem(self.name, prompt, expression, solution, difficulty, {"numbers": numbers, "target": target})

    def answer_in(self, span: str) -> str | None:
        """The expression of the final answer. It may state its result ("E = 81"), which must then be E's
        value; anything after the result ("E = 128 = 5") or a wrong result makes it no answer."""
        expression, *results = span.split("=")
        if len(results) > 1:
            return None
        if results:
            try:
                if parse_number(results[0]) != evaluate(expression)[0]:
                    return None
            except ExprError:
                return None
        return expression.strip() or None

    def fallback_answer(self, completion: str) -> str | None:
        """Lenient: the last run of arithmetic holding an operator and a digit (up to its "=")."""
        found = None
        for run in _EXPRESSION_RUN.finditer(completion[-MAX_TAIL_CHARS:]):
            if _HAS_OPERATOR.search(run.group(0)) and _HAS_DIGIT.search(run.group(0)):
                found = run.group(0).strip()
        return found

    def same_answer(self, problem: Problem, a: str, b: str) -> bool:
        """Every correct expression is one answer ("3 + 4" = "4 + 3" = "2 * 3 + 1" for 7); the others are
        grouped by value ("5 + 1" = "6"), and by text when they do not parse."""
        return self._answer_class(problem, a) == self._answer_class(problem, b)

    def _answer_class(self, problem: Problem, answer: str) -> tuple:
        try:
            return ("correct",) if self.check(problem, answer) else ("value", evaluate(answer)[0])
        except Exception:  # not an expression of the grammar (or over its size caps)
            return ("text", "".join(answer.split()))

    def check(self, problem: Problem, answer: str) -> bool:
        value, literals = evaluate(answer)
        return value == problem.meta["target"] and not Counter(literals) - Counter(problem.meta["numbers"])


_EXPRESSION_RUN = re.compile(r"[\d +\-*/×÷−()]+")
_HAS_OPERATOR = re.compile(r"[+\-*/×÷−]")
_HAS_DIGIT = re.compile(r"\d")
