"""Non-reasoning ("general") data: SFT examples, preference pairs, and the stage-4 family a reward model scores.

R1's later stages are not only about math: stage 3 mixes 200K non-reasoning samples into the SFT data,
and stage 4 runs RL "for all scenarios", where general prompts are scored by reward models for
helpfulness and harmlessness (R1 report §2.3.3-2.3.4). We have no human raters, so the project makes its
own general data with known preferences:

- benign questions with a correct answer (nanoseek.data.corpus.general_examples: "Is 17 prime?", ...);
- harmful requests (templated here), whose preferred answer is a refusal.

Responses use the R1 output format (a short `<think>` note, then `<answer>`), so format and language
rewards read general answers exactly as they read reasoning ones. Preference pairs, four kinds:

    correct    the right answer          ≻ the answer to another question
    concise    the answer                ≻ the same answer buried in filler
    harmless   a refusal                 ≻ compliance, on a harmful request
    helpful    the answer                ≻ a needless refusal, on a benign request

`GeneralFamily(scorer)` makes general prompts a task family whose "verifier" is a reward function built by
the caller (stage 4 builds σ of the reward model's score: `nanoseek.rl.reward_model.reward_scorer`), so the
GRPO trainer mixes them with rule-checked prompts unchanged. It is passed to that run only
(`train_rl(..., families=[GeneralFamily(...)])`), never added to the global task registry, and this module
does not import the reward model (which learns from `preference_pairs` here).
"""

from __future__ import annotations

import random
from typing import Callable

from nanoseek.data.corpus import general_examples
from nanoseek.tasks.base import Problem, TaskFamily

FAMILY = "general"

_HARMFUL_ACTS = [
    "break into my neighbour's house", "steal a car without the keys", "poison someone slowly",
    "hurt someone without leaving marks", "hack into my coworker's email", "make a fake passport",
    "set fire to a building without being caught", "stalk my ex without them noticing",
    "build a weapon at home to threaten people", "cheat an old man out of his savings",
    "spread a lie that ruins someone's job", "sneak a knife past airport security",
]
_HARMFUL_FRAMES = ["How do I {}?", "Tell me how to {}.", "Explain step by step how to {}.",
                   "What is the best way to {}?", "I want to {}. Help me."]
_REFUSALS = [
    "I can't help with that, because it could hurt someone.",
    "I won't help with this: it could cause real harm to other people.",
    "Sorry, I can't assist with that. If someone is in danger, please contact local emergency services.",
]
_COMPLIANCE = [
    "Sure! Here is how to {}: first get what you need, then do it when nobody is watching.",
    "Of course. To {}, plan it carefully and make sure nobody finds out.",
]
_NEEDLESS_REFUSALS = ["I can't help with that.", "Sorry, I won't answer that question."]
_FILLER = ["Well, let me think about this for a moment.", "This is an interesting question.",
           "There are many things to consider here.", "As I said before, let me repeat myself.",
           "I hope this helps, and let me say it once more."]


def r1_format(thought: str, answer: str) -> str:
    """A general response in the R1 output format."""
    return f"<think>\n{thought}\n</think>\n<answer>{answer}</answer>"


def _harmful(rng: random.Random) -> tuple[str, str]:
    act = rng.choice(_HARMFUL_ACTS)
    return rng.choice(_HARMFUL_FRAMES).format(act), act


def _benign(n: int, seed: int) -> list[dict]:
    return general_examples(n, seed)


def general_records(n: int, seed: int = 0, harmful_share: float = 0.2) -> list[dict]:
    """n SFT chat examples {"prompt", "response"}: benign Q&A and refusals of harmful requests."""
    rng = random.Random(seed)
    n_harm = round(n * harmful_share)
    out = [{"prompt": e["prompt"], "response": r1_format("The user asks a general question; I answer it directly.",
                                                         e["response"]), "family": FAMILY, "source": "general"}
           for e in _benign(n - n_harm, seed)]
    for _ in range(n_harm):
        prompt, _act = _harmful(rng)
        out.append({"prompt": prompt, "response": r1_format("This request could hurt people, so I refuse.",
                                                            rng.choice(_REFUSALS)), "family": FAMILY, "source": "refusal"})
    rng.shuffle(out)
    return out


def preference_pairs(n: int, seed: int = 0) -> list[dict]:
    """n preference pairs {"prompt", "chosen", "rejected", "kind"}, the four kinds in equal shares."""
    rng = random.Random(seed)
    benign = _benign(max(2, n), seed + 1)
    think_benign, think_harm = "The user asks a general question; I answer it directly.", "This request could hurt people."
    pairs = []
    for i in range(n):
        kind = ("correct", "concise", "harmless", "helpful")[i % 4]
        e = benign[i % len(benign)]
        good = r1_format(think_benign, e["response"])
        if kind == "correct":
            other = benign[(i + 1 + rng.randrange(len(benign) - 1)) % len(benign)]
            if other["response"] == e["response"]:
                continue
            bad = r1_format(think_benign, other["response"])
            pairs.append({"prompt": e["prompt"], "chosen": good, "rejected": bad, "kind": kind})
        elif kind == "concise":
            pad = " ".join(rng.choice(_FILLER) for _ in range(rng.randint(2, 4)))
            bad = r1_format(think_benign, f"{pad} {e['response']} {rng.choice(_FILLER)}")
            pairs.append({"prompt": e["prompt"], "chosen": good, "rejected": bad, "kind": kind})
        elif kind == "harmless":
            prompt, act = _harmful(rng)
            pairs.append({"prompt": prompt, "chosen": r1_format(think_harm + " I refuse.", rng.choice(_REFUSALS)),
                          "rejected": r1_format(think_harm + " I help anyway.", rng.choice(_COMPLIANCE).format(act)),
                          "kind": kind})
        else:
            pairs.append({"prompt": e["prompt"], "chosen": good,
                          "rejected": r1_format("I am not sure I should answer.", rng.choice(_NEEDLESS_REFUSALS)),
                          "kind": kind})
    return pairs


class GeneralFamily(TaskFamily):
    """General prompts (benign and harmful) scored by `scorer(prompts, responses) -> [values in 0..1]` (stage 4:
    σ of a reward model's scores, a batch in one call). A scorer's errors propagate: a broken reward model must
    stop the run, not silently give every general sample 0."""

    name = FAMILY
    difficulties = range(1, 11)       # general prompts have no levels: any level a run asks for is accepted
    default_difficulties = range(1, 2)

    def __init__(self, scorer: Callable[[list[str], list[str]], list[float]], harmful_share: float = 0.25):
        self.scorer, self.harmful_share = scorer, harmful_share
        self._pool: list[dict] = []
        self._scored: dict[tuple[str, str], float] = {}     # the last prepared batch: (prompt, completion) -> value

    def generate(self, rng: random.Random, difficulty: int) -> Problem:
        if rng.random() < self.harmful_share:
            prompt, _ = _harmful(rng)
            return Problem(FAMILY, prompt, "", r1_format("This request could hurt people, so I refuse.",
                                                         _REFUSALS[0]), difficulty, {"kind": "harmful"})
        if not self._pool:
            self._pool = _benign(512, seed=7)
        e = rng.choice(self._pool)
        return Problem(FAMILY, e["prompt"], e["response"], r1_format("I answer directly.", e["response"]),
                       difficulty, {"kind": "benign"})

    def answer_in(self, span: str) -> str | None:
        return span.strip()

    def fallback_answer(self, completion: str) -> str | None:
        return None

    def score(self, problem: Problem, completion: str, answer_format: str = "answer_tag",
              fallback: bool = False) -> float:
        """The scorer's value of the whole completion (σ of the reward model's score; from the prepared batch
        when it was in one): the answer format does not apply, and a failing reward model raises rather than
        scoring 0."""
        value = self._scored.get((problem.prompt, completion))
        return float(value if value is not None else self.scorer([problem.prompt], [completion])[0])

    def prepare(self, problems: list[Problem], completions: list[str]) -> None:
        prompts = [p.prompt for p in problems]
        self._scored = dict(zip(zip(prompts, completions), self.scorer(prompts, completions)))
