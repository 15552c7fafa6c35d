"""A safe evaluator for the arithmetic a model writes: never `eval`, never slow, never unbounded.

Completions are untrusted text. Python's `eval` would run anything, and even a pure arithmetic evaluator
can be made to hang by exponentiation (`9**9**9`) or to overflow the stack by nesting. So the grammar has
only integers, + - * / (also × ÷ −), unary signs and parentheses, exact rational arithmetic with
`fractions.Fraction`, and hard caps on the input length, literal size and nesting depth. With at most
MAX_EXPR_CHARS characters and MAX_LITERAL_DIGITS digits per literal, every intermediate value has at most a
few hundred digits, so one call is microseconds to milliseconds whatever the input.

    expr   := term (("+" | "-") term)*
    term   := factor (("*" | "/") factor)*
    factor := ("+" | "-") factor | INT | "(" expr ")"
"""

from __future__ import annotations

import re
from fractions import Fraction

MAX_EXPR_CHARS = 200
MAX_LITERAL_DIGITS = 12
MAX_DEPTH = 32
MAX_NUMBER_CHARS = 40

_OPS = {"+": "+", "-": "-", "−": "-", "*": "*", "/": "/", "×": "*", "÷": "/", "(": "(", ")": ")"}


class ExprError(ValueError):
    """The text is not an expression of this grammar (or breaks a size limit)."""


def tokenize(text: str) -> list[str | int]:
    if len(text) > MAX_EXPR_CHARS:
        raise ExprError(f"expression longer than {MAX_EXPR_CHARS} characters")
    tokens: list[str | int] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c in "0123456789":
            j = i
            while j < len(text) and text[j] in "0123456789":
                j += 1
            if j - i > MAX_LITERAL_DIGITS:
                raise ExprError(f"number with more than {MAX_LITERAL_DIGITS} digits")
            tokens.append(int(text[i:j]))
            i = j
        elif c in _OPS:
            tokens.append(_OPS[c])
            i += 1
        elif c.isspace():
            i += 1
        else:
            raise ExprError(f"unexpected character {c!r}")
    return tokens


class _Parser:
    def __init__(self, tokens: list[str | int]):
        self.tokens, self.pos, self.depth = tokens, 0, 0
        self.literals: list[int] = []

    def peek(self):
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self):
        tok = self.peek()
        self.pos += 1
        return tok

    def expr(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            op, rhs = self.take(), self.term()
            value = value + rhs if op == "+" else value - rhs
        return value

    def term(self) -> Fraction:
        value = self.factor()
        while self.peek() in ("*", "/"):
            op, rhs = self.take(), self.factor()
            if op == "*":
                value = value * rhs
            elif rhs == 0:
                raise ExprError("division by zero")
            else:
                value = value / rhs
        return value

    def factor(self) -> Fraction:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ExprError(f"nested deeper than {MAX_DEPTH}")
        tok = self.take()
        if isinstance(tok, int):
            self.literals.append(tok)
            value = Fraction(tok)
        elif tok in ("+", "-"):
            value = self.factor()
            value = -value if tok == "-" else value
        elif tok == "(":
            value = self.expr()
            if self.take() != ")":
                raise ExprError("missing ')'")
        else:
            raise ExprError(f"unexpected {tok!r}" if tok is not None else "unexpected end")
        self.depth -= 1
        return value


def evaluate(text: str) -> tuple[Fraction, list[int]]:
    """Value of `text` and the integer literals it uses, in order. Raises ExprError on anything else."""
    parser = _Parser(tokenize(text))
    value = parser.expr()
    if parser.pos != len(parser.tokens):
        raise ExprError(f"unexpected {parser.peek()!r}")
    return value, parser.literals


_NUMBER = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[+-]?\d+/\d+")


def parse_number(text: str) -> Fraction | None:
    """A plain number ("-12", "1,234", "3.50", "7/2") as an exact Fraction, else None.

    Checked against a strict pattern first: `Fraction("1e999999999")` would build a huge integer.
    """
    text = text.strip()
    if not text or len(text) > MAX_NUMBER_CHARS or not _NUMBER.fullmatch(text):
        return None
    try:
        return Fraction(text.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None
