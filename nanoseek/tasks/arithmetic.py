"""Multi-digit arithmetic: a + b, a - b, a * b with the schoolbook method written out.

Difficulty d is the number of digits of the longer operand (the other has 1..d digits; for products at
most ceil(d/2), so the worked solution stays a few lines). The solution is the column method a person
writes down — digit sums with carries, differences with borrows, one partial product per digit — so a
small model can learn an algorithm rather than memorise a table, and errors show where a step slipped.
"""

from __future__ import annotations

import random

from nanoseek.tasks.base import Problem, TaskFamily


def _digits(n: int) -> list[int]:
    """Digits of n, least significant first."""
    return [int(c) for c in reversed(str(n))]


def _add_steps(a: int, b: int) -> list[str]:
    lines = [f"Add {a} + {b} column by column from the right."]
    da, db, carry = _digits(a), _digits(b), 0
    for k in range(max(len(da), len(db))):
        x = da[k] if k < len(da) else 0
        y = db[k] if k < len(db) else 0
        s = x + y + carry
        terms = f"{x} + {y}" + (f" + {carry}" if carry else "")
        carry, digit = divmod(s, 10)
        lines.append(f"column {k + 1}: {terms} = {s}, write {digit}, carry {carry}")
    if carry:
        lines.append(f"write the last carry {carry}")
    return lines


def _sub_steps(a: int, b: int) -> list[str]:  # a >= b
    lines = [f"Subtract {a} - {b} column by column from the right."]
    da, db, borrow = _digits(a), _digits(b), 0
    for k in range(len(da)):
        y = db[k] if k < len(db) else 0
        left = f"{da[k]} - {y}" if not borrow else f"{da[k]} - 1 - {y}"
        x = da[k] - borrow
        if x >= y:
            borrow = 0
            lines.append(f"column {k + 1}: {left} = {x - y}, write {x - y}, borrow 0")
        else:
            borrow = 1
            lines.append(f"column {k + 1}: {left} is below zero, so borrow ten: {x + 10} - {y} = "
                         f"{x + 10 - y}, write {x + 10 - y}, borrow 1")
    return lines


def _mul_steps(a: int, b: int) -> list[str]:
    lines = [f"Multiply {a} * {b} by each digit of {b}."]
    partials = []
    for k, d in enumerate(_digits(b)):
        p = a * d
        partials.append(p * 10**k)
        shift = f", shifted by {k}: {p * 10**k}" if k else ""
        lines.append(f"{a} * {d} = {p}{shift}")
    if len(partials) > 1:
        lines.append(f"Add the parts: {' + '.join(map(str, partials))} = {sum(partials)}")
    return lines


class Arithmetic(TaskFamily):
    name = "arithmetic"
    difficulties = range(1, 11)
    default_difficulties = range(1, 4)

    def generate(self, rng: random.Random, difficulty: int) -> Problem:
        self.check_difficulty(difficulty)
        op = rng.choice("+-*")

        def number(n_digits: int) -> int:
            return rng.randint(10 ** (n_digits - 1) if n_digits > 1 else 0, 10**n_digits - 1)

        a = number(difficulty)
        b = number(rng.randint(1, difficulty if op != "*" else (difficulty + 1) // 2))
        if op == "-":  # non-negative differences; sums and products come in either order
            a, b = max(a, b), min(a, b)
        elif rng.random() < 0.5:
            a, b = b, a
        if op == "+":
            result, steps = a + b, _add_steps(a, b)
        elif op == "-":
            result, steps = a - b, _sub_steps(a, b)
        else:
            result, steps = a * b, _mul_steps(a, b)
        steps.append(f"So {a} {op} {b} = {result}.")
        return Problem(self.name, f"What is {a} {op} {b}?", str(result), "\n".join(steps), difficulty,
                       {"a": a, "b": b, "op": op})
