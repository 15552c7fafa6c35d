"""Verifiable tasks: seeded generators with difficulty knobs, and verifiers RL can trust.

    from nanoseek.tasks import get_family, sample_problems
    problems = sample_problems(["arithmetic", "countdown", "linear"], 300, split="test", seed=0)
    get_family(p.family).score(p, completion)      # 0.0 or 1.0, never raises

Generated families: arithmetic (digits), countdown (how many numbers), linear (equation form). User data
(GSM8K, MATH, plain question/answer JSONL) comes from `nanoseek.tasks.jsonl.load_jsonl_problems` and is
scored by the "gsm8k" / "math" / "jsonl" families through math-verify.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

from nanoseek.errors import UserError
from nanoseek.tasks.arithmetic import Arithmetic
from nanoseek.tasks.base import Problem, TaskFamily, split_of
from nanoseek.tasks.countdown import Countdown
from nanoseek.tasks.jsonl import MATH_FAMILY
from nanoseek.tasks.linear import Linear

FAMILIES: dict[str, TaskFamily] = {f.name: f for f in (Arithmetic(), Countdown(), Linear())}
MAX_TRIES = 10_000  # generation attempts per problem before giving up on finding one of the wanted split


def get_family(name: str) -> TaskFamily:
    """A generated family, or the math-verify scorer for loaded data ("gsm8k", "math", "jsonl")."""
    if name in FAMILIES:
        return FAMILIES[name]
    if name in ("gsm8k", "math", "jsonl"):
        return MATH_FAMILY
    raise UserError(f"unknown task family {name!r}; choose from {', '.join(FAMILIES)}")


def sample_problems(names: str | list[str], n: int, split: str = "train", seed: int = 0,
                    difficulty: int | dict[str, int] | None = None,
                    families: Mapping[str, TaskFamily] = FAMILIES) -> list[Problem]:
    """n problems of `split`, cycling through the families in `names` (a list or "a,b"); reproducible from `seed`.

    difficulty: one level for all families, a {family: level} dict, or None to draw each problem's level
    from the family's default range. Problems of the other split are generated and thrown away, so train
    and test never share a problem whatever the seeds. Small levels may repeat problems (1-digit sums).
    families: where the names are looked up (the built-in families, or a run's own mapping that adds some).
    """
    names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    if split not in ("train", "test"):
        raise UserError(f"split {split!r}: use 'train' or 'test'")
    if not names:
        raise UserError("no task families given; choose from " + ", ".join(families))
    for name in names:
        if name not in families:
            raise UserError(f"unknown task family {name!r}; choose from {', '.join(families)}")
    rng = random.Random(seed)
    out = []
    for i in range(n):
        family = families[names[i % len(names)]]
        level = difficulty.get(family.name) if isinstance(difficulty, dict) else difficulty
        level = rng.choice(family.default_difficulties) if level is None else level
        for _ in range(MAX_TRIES):
            problem = family.generate(rng, level)
            if problem.split == split:
                out.append(problem)
                break
        else:
            raise UserError(f"found no {split} problem of {family.name} at difficulty {level} in {MAX_TRIES} "
                            "tries; raise the difficulty")
    return out


__all__ = ["FAMILIES", "Problem", "TaskFamily", "get_family", "sample_problems", "split_of"]
