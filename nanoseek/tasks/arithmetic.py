"""Multi-digit arithmetic: a + b, a - b, a * b with the schoolbook method written out.

Difficulty d is the number of digits of the longer operand (the other has 1..d digits; for products at
most ceil(d/2), so the worked solution stays a few lines). The solution is the column method a person
writes down — digit sums with carries, differences with borrows, one partial product per digit — so a
small model can learn an algorithm rather than memorise a table, and errors show where a step slipped.

`worked_solution(check=True)` also checks each column by a second route (the digits added in the other order,
a difference added back, a product turned round); with `slip=True` one column is first written wrong, and
its check catches it: "check: 8 + 7 = 15, not 14" / "Wait, redo column 1: ...". The corpus puts such
self-verification into a minority of its documents: a behaviour the base has but seldom uses, which R1-Zero's
RL can find pays (the report's "aha" curve; Gandhi et al. 2025 show RL amplifies verification and
backtracking only when the base already shows them).
"""

from __future__ import annotations

import random

from nanoseek.tasks.base import Problem, TaskFamily


def _digits(n: int) -> list[int]:
    """Digits of n, least significant first."""
    return [int(c) for c in reversed(str(n))]


def _slipped(value: int, rng: random.Random, lo: int = 0, hi: int | None = None) -> int:
    """A plausible wrong value near `value` (off by one, or by ten for a multi-digit one), in [lo, hi]."""
    for _ in range(20):
        wrong = value + rng.choice([-1, 1]) * (10 if value >= 10 and rng.random() < 0.3 else 1)
        if wrong != value and wrong >= lo and (hi is None or wrong <= hi):
            return wrong
    return value + 1 if hi is None or value + 1 <= hi else value - 1


def _step(lines: list[str], line, value: int, check, check_on: bool, slip: bool, rng, hi: int | None = None) -> None:
    """Append one step: line(v) writes it with value v, check(v) checks a written v by a second route (ending
    ", not ..." when v is wrong). A slip writes a near value first, then its failing check and the redo."""
    if slip:
        wrong = _slipped(value, rng, hi=hi)
        lines += [line(wrong), check(wrong), f"Wait, redo {line(value)}"]
    else:
        lines.append(line(value))
        if check_on:
            lines.append(check(value))


def _add_steps(a: int, b: int, check: bool, slip: int | None, rng: random.Random | None) -> list[str]:
    lines = [f"Add {a} + {b} column by column from the right."]
    da, db, carry = _digits(a), _digits(b), 0
    for k in range(max(len(da), len(db))):
        x = da[k] if k < len(da) else 0
        y = db[k] if k < len(db) else 0
        s = x + y + carry
        terms = f"{x} + {y}" + (f" + {carry}" if carry else "")
        again = f"{y} + {x}" + (f" + {carry}" if carry else "")      # the check adds in the other order
        _step(lines, lambda v: f"column {k + 1}: {terms} = {v}, write {v % 10}, carry {v // 10}", s,
              lambda v: f"check: {again} = {s}" + (f", not {v}" if v != s else ""), check, slip == k, rng, hi=19)
        carry = s // 10
    if carry:
        lines.append(f"write the last carry {carry}")
    return lines


def _sub_steps(a: int, b: int, check: bool, slip: int | None, rng: random.Random | None) -> list[str]:  # a >= b
    lines = [f"Subtract {a} - {b} column by column from the right."]
    da, db, borrow = _digits(a), _digits(b), 0
    for k in range(len(da)):
        y = db[k] if k < len(db) else 0
        left = f"{da[k]} - {y}" if not borrow else f"{da[k]} - 1 - {y}"
        x = da[k] - borrow
        top = x if x >= y else x + 10                               # what the column subtracts y from
        if x >= y:
            borrow = 0
            line = lambda v: f"column {k + 1}: {left} = {v}, write {v}, borrow 0"  # noqa: E731
        else:
            borrow = 1
            line = lambda v: (f"column {k + 1}: {left} is below zero, so borrow ten: {x + 10} - {y} = "  # noqa: E731
                              f"{v}, write {v}, borrow 1")
        # the check adds the written digit back: d + y = top, or d' + y is not top
        _step(lines, line, top - y, lambda v: f"check: {v} + {y} = {v + y}" + (f", not {top}" if v + y != top else ""),
              check, slip == k, rng, hi=9)
    return lines


def _mul_steps(a: int, b: int, check: bool, slip: int | None, rng: random.Random | None) -> list[str]:
    lines = [f"Multiply {a} * {b} by each digit of {b}."]
    partials = []
    for k, d in enumerate(_digits(b)):
        p = a * d
        partials.append(p * 10**k)
        shift = f", shifted by {k}: {p * 10**k}" if k else ""
        # the check multiplies the other way round
        _step(lines, lambda v: f"{a} * {d} = {v}" + (shift if v == p else ""), p,
              lambda v: f"check: {d} * {a} = {p}" + (f", not {v}" if v != p else ""), check, slip == k, rng)
    if len(partials) > 1:
        lines.append(f"Add the parts: {' + '.join(map(str, partials))} = {sum(partials)}")
    return lines


_STEPS = {"+": _add_steps, "-": _sub_steps, "*": _mul_steps}


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
        result = {"+": a + b, "-": a - b, "*": a * b}[op]
        steps = _STEPS[op](a, b, False, None, None) + [f"So {a} {op} {b} = {result}."]
        return Problem(self.name, f"What is {a} {op} {b}?", str(result), "\n".join(steps), difficulty,
                       {"a": a, "b": b, "op": op})

    def worked_solution(self, problem: Problem, rng: random.Random, check: bool, slip: bool) -> str:
        """Checks every column (added in the other order, a difference added back, a product turned round);
        with `slip`, one column is first written wrong and its check catches and redoes it."""
        a, b, op = problem.meta["a"], problem.meta["b"], problem.meta["op"]
        columns = len(_digits(b)) if op == "*" else len(_digits(max(a, b)))
        where = rng.randrange(columns) if slip else None
        steps = _STEPS[op](a, b, check or slip, where, rng)
        return "\n".join(steps + [f"So {a} {op} {b} = {problem.answer}."])
