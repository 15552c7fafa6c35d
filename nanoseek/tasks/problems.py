"""Where a run's problems come from: generated task families, or a user's JSONL file."""

from __future__ import annotations

from nanoseek.errors import UserError
from nanoseek.tasks import sample_problems
from nanoseek.tasks.base import Problem
from nanoseek.tasks.jsonl import load_jsonl_problems


def load_problems(tasks: list[str], data: str | None, n: int, split: str, seed: int,
                  difficulty: int | dict | None = None) -> list[Problem]:
    """n problems of the `split` ("train" | "test") of the task families, seeded; or, with `data`, the first n
    problems (0 = all) of a JSONL file of question/answer records (GSM8K, MATH, ...)."""
    if data:
        problems = load_jsonl_problems(data)
        if not problems:
            raise UserError(f"{data} holds no problems; point at a JSONL file with question/answer")
        return problems[:n] if n else problems
    return sample_problems(tasks, n, split=split, seed=seed, difficulty=difficulty)
