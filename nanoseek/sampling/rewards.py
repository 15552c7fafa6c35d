"""Rule-based rewards for reasoning RL (R1 §2.2.2, §2.3.3; DAPO §3.4). Pure functions of strings.

R1 trains with rules, not a learned reward model, because rules cannot be reward-hacked by a policy that
finds a model's blind spots. Each component here is a pure function that never raises and is fast on any
string (the verifiers cap what they read; the format check only counts and finds substrings):

- accuracy: the task's verifier (nanoseek.tasks), math-verify for GSM8K / MATH data, on the final answer
  written after the reasoning in the required format (R1 §2.2.2; `answer_format`: <answer> tags by default,
  or \\boxed{} / GSM8K's "####" for user data under the chat template). 0 or 1. No answer in that format
  scores 0; `answer_fallback=True` opts in to reading the last number instead (lenient).
- format: "<think>…</think>" then "<answer>…</answer>", each tag exactly once, both non-empty, nothing
  outside but whitespace. When the prompt already ends with "<think>" (the R1 template primes it), the
  completion starts inside the reasoning: `starts_in_think=True` checks it as if "<think>" preceded it.
- language consistency: share of chain-of-thought words in the target register (R1 §2.3.3 adds it to the
  accuracy reward to stop language mixing, at a small cost in accuracy).
- overlong: DAPO's soft length penalty, eq. (13): 0 up to L_max - L_cache tokens, then linear down to -1 at
  L_max, -1 beyond; it tells truncated-by-length samples apart from wrong ones without a cliff.
- user functions: any `module:function` with TRL's `reward_funcs` signature, `f(prompts, completions, **kwargs)
  -> list[float | None]` (kwargs: the problem's data columns), weighted beside the rules; None = no opinion.

The weighted sum is `compute_rewards(...)["total"]`. Defaults (R1-Zero): accuracy 1.0 dominates; format
0.2 is enough signal to learn the template within a group (GRPO normalises by the group's std) but never
lets a well-formatted wrong answer beat a correct one; language 0.0 and no overlong penalty (turn them on
for R1's reasoning stage / long-output runs in the recipe).
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from nanoseek.errors import UserError
from nanoseek.tasks import FAMILIES, Problem, TaskFamily, get_family
from nanoseek.tasks.base import ANSWER_FORMATS
from nanoseek.tasks.language import REGISTERS, language_share

TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def accuracy_reward(problem: Problem, completion: str, answer_format: str = "answer_tag", fallback: bool = False,
                    families: Mapping[str, TaskFamily] = FAMILIES) -> float:
    """1.0 if the final answer, written in `answer_format` after the reasoning, is right by the problem
    family's verifier (a family of `families`, else a built-in one: `get_family`), else 0.0. fallback=True
    (lenient): without such an answer, the family's guess (the last number) is scored instead."""
    return _family(problem.family, families).score(problem, completion, answer_format, fallback)


def _family(name: str, families: Mapping[str, TaskFamily]) -> TaskFamily:
    """The family of `families` named so, else a built-in one (`get_family`: an unknown name is a UserError)."""
    return families[name] if name in families else get_family(name)


def format_reward(completion: str, starts_in_think: bool = False) -> float:
    """1.0 for exactly `<think>R</think> <answer>A</answer>` (R, A non-blank; only whitespace around), else 0.0."""
    text = ("<think>" + completion if starts_in_think else completion).strip()
    if any(text.count(tag) != 1 for tag in TAGS):
        return 0.0
    if not (text.startswith("<think>") and text.endswith("</answer>")):
        return 0.0
    think_end, answer_start = text.find("</think>"), text.find("<answer>")
    ok = (think_end < answer_start
          and text[think_end + len("</think>"):answer_start].strip() == ""
          and text[len("<think>"):think_end].strip() != ""
          and text[answer_start + len("<answer>"):-len("</answer>")].strip() != "")
    return 1.0 if ok else 0.0


def reasoning_text(completion: str) -> str:
    """The chain of thought: up to the first </think> (after any <think>), else up to <answer>, else all."""
    end = completion.find("</think>")
    if end < 0:
        end = completion.find("<answer>")
    text = completion if end < 0 else completion[:end]
    start = text.find("<think>")
    return text if start < 0 else text[start + len("<think>"):]


def language_consistency(completion: str, register: str = "en") -> float:
    """Share of the chain-of-thought words written in `register` (0.0 when it has no words)."""
    return language_share(reasoning_text(completion), register)


def overlong_penalty(n_tokens: int, max_tokens: int, cache_tokens: int) -> float:
    """DAPO eq. (13): 0 if n <= L_max - L_cache; (L_max - L_cache - n) / L_cache up to L_max; -1 beyond."""
    soft_start = max_tokens - cache_tokens
    if n_tokens <= soft_start:
        return 0.0
    if n_tokens > max_tokens or cache_tokens <= 0:
        return -1.0
    return (soft_start - n_tokens) / cache_tokens


@dataclass
class RewardConfig:
    accuracy: float = 1.0         # weight of the verifier's 0/1
    format: float = 0.2           # weight of the template check
    language: float = 0.0         # weight of language consistency (R1 stage 2 turns it on)
    overlong: float = 1.0         # weight of the DAPO penalty (active only when max_tokens > 0)
    max_tokens: int = 0           # L_max; 0 = no overlong penalty
    cache_tokens: int = 0         # L_cache, the soft band below L_max (DAPO: 4096 of 20480)
    register: str = "en"          # target register when the problem does not name one (meta["register"])
    starts_in_think: bool = False  # the prompt ends with "<think>", so completions start inside it
    answer_format: str = "answer_tag"  # where the final answer must be: "answer_tag" | "boxed" | "gsm8k" ("####")
    answer_fallback: bool = False  # lenient: without an answer in that format, score the last number
    functions: list[str] = field(default_factory=list)  # user reward functions "module:function" (TRL reward_funcs)
    weights: list[float] = field(default_factory=list)   # one weight per function; [] = 1.0 each

    def __post_init__(self) -> None:
        if self.answer_format not in ANSWER_FORMATS:
            raise UserError(f"rewards.answer_format={self.answer_format!r}; choose one of {', '.join(ANSWER_FORMATS)}")
        if self.register not in REGISTERS:
            raise UserError(f"rewards.register={self.register!r}; choose one of {', '.join(REGISTERS)}")
        if self.max_tokens < 0 or not 0 <= self.cache_tokens <= self.max_tokens:
            raise UserError(f"rewards.max_tokens={self.max_tokens}, cache_tokens={self.cache_tokens}: need "
                            "0 <= cache_tokens <= max_tokens (max_tokens 0 turns the penalty off)")
        for name in self.functions:
            module, _, function = name.partition(":")
            if not (module.strip() and function.strip()):
                raise UserError(f"rewards.functions: {name!r} is not module:function, e.g. \"my_rewards:length_penalty\"")
        if self.weights and len(self.weights) != len(self.functions):
            raise UserError(f"rewards.weights has {len(self.weights)} values for {len(self.functions)} functions; "
                            "give one weight per function (or none: 1.0 each)")


RULES = ("accuracy", "format", "language", "overlong", "total")    # the keys compute_rewards always returns


@dataclass(frozen=True)
class RewardFunction:
    """A user reward function, logged as reward/<name> and weighted by `weight` in the total."""
    name: str
    fn: Callable
    weight: float


def load_reward_functions(cfg: RewardConfig) -> list[RewardFunction]:
    """Import `cfg.functions` ("module:function", the module found on PYTHONPATH or else in the current directory,
    which the `nanoseek` script does not put on sys.path by itself). Runs before anything is
    written: a module that does not import or a name that is not a function is a one-line UserError. Names are
    the function names, so two functions (or a function and a rule reward) may not share one."""
    if cfg.functions and os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    out: list[RewardFunction] = []
    for i, spec in enumerate(cfg.functions):
        module_name, _, attr = spec.partition(":")
        try:
            module = importlib.import_module(module_name.strip())
        except Exception as e:              # ImportError, or the module's own code failing as it is imported
            raise UserError(f"rewards.functions: cannot import {module_name.strip()!r} for {spec!r} "
                            f"({type(e).__name__}: {e}); put it on PYTHONPATH or in the current directory") from None
        fn = getattr(module, attr.strip(), None)
        if not callable(fn):
            raise UserError(f"rewards.functions: {module_name.strip()!r} has no function {attr.strip()!r} ({spec!r})")
        name = attr.strip()
        if name in RULES or any(f.name == name for f in out):
            raise UserError(f"rewards.functions: two rewards are named {name!r} ({spec!r}); rename the function")
        out.append(RewardFunction(name, fn, cfg.weights[i] if cfg.weights else 1.0))
    return out


def problem_columns(problem: Problem) -> dict:
    """The data columns a user reward function receives as keyword arguments (TRL passes every dataset column
    but the prompt): a JSONL problem's record as it is in the file (GSM8K's `answer` is the whole "... #### 42"),
    a generated problem's gold `answer` and worked `solution`."""
    record = problem.meta.get("record")
    if record is None:
        return {"answer": problem.answer, "solution": problem.solution}
    return {k: v for k, v in record.items() if k not in ("prompt", "prompts", "completion", "completions")}


def call_reward_function(f: RewardFunction, problem: Problem, completion: str) -> float:
    """f's score of one completion, TRL's call with batches of one: f(prompts=[prompt], completions=[completion],
    **{column: [value]}). None (the function does not apply) is NaN: it adds nothing to the total."""
    kwargs = {k: [v] for k, v in problem_columns(problem).items()}
    out = f.fn(prompts=[problem.prompt], completions=[completion], **kwargs)
    value = out[0] if isinstance(out, (list, tuple)) and len(out) == 1 else out
    if value is None:
        return math.nan
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    raise UserError(f"reward function {f.name!r} returned {str(out)[:60]}; return a list with one finite float "
                    "(or None) per completion")


def _verified_text(cfg: RewardConfig, completion: str) -> str:
    """What the accuracy verifier reads: a completion that starts inside <think> has its answer only after a
    </think> it writes itself."""
    return "<think>" + completion if cfg.starts_in_think else completion


def compute_rewards_batch(cfg: RewardConfig, problems: Sequence[Problem], completions: Sequence[str],
                          n_tokens: Sequence[int], families: Mapping[str, TaskFamily] = FAMILIES,
                          functions: Sequence[RewardFunction] = ()) -> list[dict[str, float]]:
    """`compute_rewards` of each (problem, completion, n_tokens), after each family of the batch has seen its
    share at once (`TaskFamily.prepare`: a reward model scores the general prompts' completions in one forward
    instead of one each, ~3 s of a stage-4 step on the `small` preset)."""
    for name in {p.family for p in problems}:
        rows = [(p, _verified_text(cfg, c)) for p, c in zip(problems, completions) if p.family == name]
        _family(name, families).prepare([p for p, _ in rows], [c for _, c in rows])
    return [compute_rewards(cfg, p, c, n, families, functions) for p, c, n in zip(problems, completions, n_tokens)]


def compute_rewards(cfg: RewardConfig, problem: Problem, completion: str, n_tokens: int,
                    families: Mapping[str, TaskFamily] = FAMILIES,
                    functions: Sequence[RewardFunction] = ()) -> dict[str, float]:
    """Each unweighted component and the weighted "total" for one completion of `n_tokens` tokens; the
    accuracy by the problem's family in `families` (a run passes its own mapping when it adds families).
    `functions` (load_reward_functions) add one component each, NaN where a function returned None."""
    register = problem.meta.get("register", cfg.register)
    out = {
        "accuracy": accuracy_reward(problem, _verified_text(cfg, completion), cfg.answer_format, cfg.answer_fallback,
                                    families),
        "format": format_reward(completion, cfg.starts_in_think),
        "language": language_consistency(completion, register),
        "overlong": overlong_penalty(n_tokens, cfg.max_tokens, cfg.cache_tokens) if cfg.max_tokens else 0.0,
    }
    out["total"] = (cfg.accuracy * out["accuracy"] + cfg.format * out["format"]
                    + cfg.language * out["language"] + cfg.overlong * out["overlong"])
    for f in functions:
        out[f.name] = call_reward_function(f, problem, completion)
        out["total"] += 0.0 if math.isnan(out[f.name]) else f.weight * out[f.name]
    return out
