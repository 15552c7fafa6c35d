"""Reflection: does a completion check or redo a step before it answers (the R1 report's "aha" behaviour)?

R1-Zero's report (§2.2.4) shows the policy learning, unprompted, to stop, re-evaluate a step and redo it,
with the share of such completions rising over RL. We measure the same thing on our tasks with fixed
markers rather than a judge model: a completion REFLECTS when its chain of thought (the text inside
<think>, before </think>: `rewards.reasoning_text`) holds one of `REFLECTION_MARKERS`:

- a marker ending in ":" ("Check:") counts at the start of a line (after indentation): the worked solutions
  verify a result on a line of its own ("Check: 3 * 4 + 2 = 14");
- any other marker counts as whole words anywhere, case-insensitive, its trailing punctuation optional:
  "Wait," matches "wait" and "Wait,", "let me check" matches "Let me  check" (any run of spaces).

The same markers in the synthetic "alt" register (nanoseek.tasks.language) count too: each marker is run
through `render(marker, "alt")`, the word map the task solutions are rendered with, so a chain of thought
reasoning in "alt" ("Zoq: ..." for a check line) reflects exactly when its "en" rendering does. The alt forms
are derived when this module loads, so a word added to the vocabulary later maps here without an edit.

The worked solutions of the task corpus write these markers (a "Check:" line, "Wait," before a redo), so the
rate on the base is what pretraining taught, and its rise under RL is the behaviour RL selected.
"""

from __future__ import annotations

import re

from nanoseek.sampling.rewards import reasoning_text
from nanoseek.tasks.language import render

# The one list of reflection markers (rules: module doc). The corpus's worked solutions use these words.
REFLECTION_MARKERS = ("Check:", "Wait,", "redo", "recheck", "let me check")


def _phrase(marker: str) -> str:
    """Regex of a marker's words, case left to the flag: trailing punctuation dropped, spaces as \\s+."""
    return r"\s+".join(re.escape(w) for w in marker.rstrip(",:;.!").split())


def _patterns() -> tuple[re.Pattern, re.Pattern]:
    forms = sorted({form for m in REFLECTION_MARKERS for form in (m, render(m, "alt"))})
    lines = [_phrase(f) for f in forms if f.endswith(":")]
    words = [_phrase(f) for f in forms if not f.endswith(":")]
    line_re = re.compile(r"^[ \t]*(?:" + "|".join(lines) + r"):", re.IGNORECASE | re.MULTILINE)
    word_re = re.compile(r"\b(?:" + "|".join(words) + r")\b", re.IGNORECASE)
    return line_re, word_re


_LINE_MARKER, _WORD_MARKER = _patterns()


def reflects(completion: str) -> bool:
    """True when the chain of thought of `completion` (inside <think>, before </think>; a completion that
    starts inside the reasoning, as the R1 template primes it, needs no opening tag) checks or redoes a step
    by `REFLECTION_MARKERS`. Markers after </think> (in the answer) do not count. Never raises."""
    text = reasoning_text(completion)
    return bool(_LINE_MARKER.search(text) or _WORD_MARKER.search(text))
