"""Linear equations in one unknown with an integer solution: "Solve for x: 3x - 5 = 2x + 7."

Difficulty 1: x + b = c; 2: a·x + b = c; 3: x on both sides, a·x + b = d·x + e; 4: as 3 with larger
coefficients and solutions. Problems are built from the solution x, so it is always an integer. The worked
solution moves terms across with the operation named ("Subtract 12 from both sides"), divides, and checks
by substituting back — the self-verification habit R1 rewards.
"""

from __future__ import annotations

import random

from nanoseek.tasks.base import Problem, TaskFamily


def _side(a: int, b: int) -> str:
    """a·x + b as text: "3x - 5", "x", "-x + 2", "7"."""
    x = "" if a == 0 else "x" if a == 1 else "-x" if a == -1 else f"{a}x"
    if not x:
        return str(b)
    return x if b == 0 else f"{x} + {b}" if b > 0 else f"{x} - {-b}"


def _paren(n: int) -> str:
    return f"({n})" if n < 0 else str(n)


def _nonzero(rng: random.Random, lo: int, hi: int) -> int:
    return rng.choice([v for v in range(lo, hi + 1) if v != 0])


class Linear(TaskFamily):
    name = "linear"
    difficulties = range(1, 5)
    default_difficulties = range(1, 4)

    def generate(self, rng: random.Random, difficulty: int) -> Problem:
        self.check_difficulty(difficulty)
        big = difficulty == 4
        x = rng.randint(-30, 30) if big else rng.randint(-10, 10)
        a = 1 if difficulty == 1 else _nonzero(rng, -19, 19) if big else _nonzero(rng, -9, 9)
        b = _nonzero(rng, -50, 50) if big else _nonzero(rng, -20, 20)
        d = 0
        if difficulty >= 3:
            d = rng.choice([v for v in range(-9, 10) if v not in (0, a)])
        e = a * x + b - d * x
        steps = _steps(a, b, d, e, x, check=True)
        prompt = f"Solve for x: {_side(a, b)} = {_side(d, e)}."
        return Problem(self.name, prompt, str(x), "\n".join(steps), difficulty, {"a": a, "b": b, "d": d, "e": e})

    def worked_solution(self, problem: Problem, rng: random.Random, check: bool, slip: bool) -> str:
        """Without `check` the substitution check is left out; with `slip` the step that yields x first gets
        it wrong (off by one), the substitution check shows the sides differ, and the step is redone."""
        m = problem.meta
        x = int(problem.answer)
        wrong = x + rng.choice([-1, 1]) if slip else None
        return "\n".join(_steps(m["a"], m["b"], m["d"], m["e"], x, check or slip, wrong))


def _steps(a: int, b: int, d: int, e: int, x: int, check: bool, wrong: int | None = None) -> list[str]:
    """The worked solution of a·x + b = d·x + e: move the x terms, move the constant, divide, (check), answer.
    wrong: a slipped value of x, written first and caught by the check."""
    steps = []
    if d:
        verb = f"Subtract {_side(d, 0)} from" if d > 0 else f"Add {_side(-d, 0)} to"
        steps.append(f"{verb} both sides: {_side(a - d, b)} = {e}")
    k = a - d  # now k·x + b = e
    verb = f"Subtract {b} from" if b > 0 else f"Add {-b} to"
    moved = f"{verb} both sides: {_side(k, 0)} = {e} {'-' if b > 0 else '+'} {abs(b)} = {e - b}"
    solve = (lambda v: f"Divide both sides by {k}: x = {e - b} / {_paren(k)} = {v}") if k != 1 else None
    if solve is None:      # k = 1: moving the constant gives x; a slip there is "x = 12 - 5 = 8"
        steps.append(moved if wrong is None else moved.rsplit("= ", 1)[0] + f"= {wrong}")
    else:
        steps += [moved, solve(x if wrong is None else wrong)]
    if wrong is not None:
        left, right = _check_sides(a, b, d, e, wrong)
        steps.append(f"Check: {left}, not {right}")
        steps.append("Wait, redo: " + (solve(x) if solve else moved))
    if check:
        left, right = _check_sides(a, b, d, e, x)
        steps.append(f"Check: {left} and {right}" if d else f"Check: {left}")
    steps.append(f"So x = {x}.")
    return steps


def _check_sides(a: int, b: int, d: int, e: int, x: int) -> tuple[str, str]:
    """Both sides at x as written by the check: ("3 * 7 + 5 = 26", "26"), or with x on the right too
    ("3 * 7 + 5 = 26", "2 * 7 + 12 = 26")."""
    times = "" if a == 1 else f"{a} * "
    left = f"{times}{_paren(x)} + {_paren(b)} = {a * x + b}"
    right = f"{d} * {_paren(x)} + {_paren(e)} = {d * x + e}" if d else str(e)
    return left, right
