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
        steps = []
        if d:
            verb = f"Subtract {_side(d, 0)} from" if d > 0 else f"Add {_side(-d, 0)} to"
            steps.append(f"{verb} both sides: {_side(a - d, b)} = {e}")
        k = a - d  # now k·x + b = e
        verb = f"Subtract {b} from" if b > 0 else f"Add {-b} to"
        steps.append(f"{verb} both sides: {_side(k, 0)} = {e} {'-' if b > 0 else '+'} {abs(b)} = {e - b}")
        if k != 1:
            steps.append(f"Divide both sides by {k}: x = {e - b} / {_paren(k)} = {x}")
        times = "" if a == 1 else f"{a} * "
        check = f"Check: {times}{_paren(x)} + {_paren(b)} = {a * x + b}"
        steps.append(check + (f" and {d} * {_paren(x)} + {_paren(e)} = {d * x + e}" if d else ""))
        steps.append(f"So x = {x}.")
        prompt = f"Solve for x: {_side(a, b)} = {_side(d, e)}."
        return Problem(self.name, prompt, str(x), "\n".join(steps), difficulty, {"a": a, "b": b, "d": d, "e": e})
