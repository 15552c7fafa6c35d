"""The reflection rate's marker rule (nanoseek.sampling.reflection) on hand-written completions."""

import pytest

from nanoseek.sampling.reflection import REFLECTION_MARKERS, reflects
from nanoseek.tasks import sample_problems
from nanoseek.tasks.language import TO_ALT, render


@pytest.mark.parametrize("text", [
    "<think>\n3 * 4 = 12, 12 + 2 = 14\nCheck: 14 - 2 = 12 and 12 / 4 = 3\n</think>\n<answer>14</answer>",
    "<think>x = 5\n  check: 2 * 5 + 1 = 11</think><answer>5</answer>",           # lower case, indented
    "<think>7 + 8 = 16. Wait, 7 + 8 = 15.</think><answer>15</answer>",
    "<think>7 + 8 = 16 wait 15</think><answer>15</answer>",
    "<think>carry the 1 ... I will redo the last column</think><answer>15</answer>",
    "<think>7 + 8 = 15; RECHECK the sum</think><answer>15</answer>",
    "<think>7 + 8 = 15, let me\n check it</think><answer>15</answer>",
    "7 + 8 = 16. Wait, 15.</think><answer>15</answer>",       # starts inside <think> (the R1 prompt opened it)
    "<think>Wait, no answer tags at all",                      # unfinished reasoning still is reasoning
])
def test_reflecting_completions(text):
    assert reflects(text)


@pytest.mark.parametrize("text", [
    "<think>3 * 4 = 12, 12 + 2 = 14</think>\n<answer>14</answer>",
    "<think>12 + 2 = 14; I check the column below</think><answer>14</answer>",     # "check" alone is a step
    "<think>the answer is 14: Check: is mid-line</think><answer>14</answer>",     # "Check:" counts at a line start
    "<think>a waiting room, redone, prechecked</think><answer>1</answer>",           # whole words only
    "<think>14</think>\n<answer>14</answer>\nCheck: 14 = 14. Wait, redo",           # markers after </think> only
    "<answer>14</answer> Wait, let me check",                                        # no reasoning before the answer
    "",
])
def test_non_reflecting_completions(text):
    assert not reflects(text)


def test_alt_register_markers_count_as_their_english_forms():
    """Markers are run through the alt word map: a check line or a redo in "alt" reflects; English marker
    words the vocabulary has no alt form for stay as they are in alt text (as `render` leaves them)."""
    assert "check" in TO_ALT                                       # "Check:" has an alt form
    alt_check = render("Check: 2 * 5 + 1 = 11", "alt")
    assert not alt_check.startswith("Check") and alt_check.endswith(": 2 * 5 + 1 = 11")
    assert reflects(f"<think>x = 5\n{alt_check}</think><answer>5</answer>")
    assert reflects(f"<think>x = 5\n{alt_check.lower()}</think><answer>5</answer>")
    assert reflects("<think>" + render("x = 5. let me check", "alt") + "</think><answer>5</answer>")
    for marker in REFLECTION_MARKERS:                              # every marker, in both registers
        for register in ("en", "alt"):
            line = render(marker, register) + " 7 + 8 = 15"
            assert reflects(f"<think>7 + 8 = 15\n{line}\n</think><answer>15</answer>"), (marker, register)
            assert not reflects(f"<think>7 + 8 = 15</think><answer>15</answer>\n{line}"), (marker, register)


def test_linear_solutions_check_their_result():
    """The linear family's worked solutions verify x on a "Check:" line, in either register."""
    for p in sample_problems("linear", 5, seed=0):
        assert reflects(p.completion("en")) and reflects(p.completion("alt"))


def test_evaluate_reports_the_reflection_rate(monkeypatch):
    """evaluate() judges each sample's reflection on its response text (with the R1 template's "<think>"
    put back) and reports the rate with its interval, beside format and length."""
    import torch

    import nanoseek.sampling.rollout as rollout
    from nanoseek.eval import PassAtKConfig, evaluate, summary_rows
    from nanoseek.tokenizer import Tokenizer

    problems = sample_problems("arithmetic", 3, split="test", seed=1)
    script = [" 1 + 2 = 4. Wait, 3\n</think> <answer>3</answer>", " Check: 3 - 2 = 1\n</think> <answer>3</answer>",
              " 3\n</think> <answer>3</answer>", " let me check 3\n</think> <answer>3</answer>",
              " 3\n</think> <answer>3</answer> Wait, redo", " 3 </think> <answer>3</answer>"]
    tok = Tokenizer.train(script + [p.prompt for p in problems], 300)
    served = []

    def fake_generate(model, prompts, cfg, stop_ids, pad_id=0, generator=None, on_token=None):
        ids = [tok.encode(script[(len(served) + i) % len(script)]) for i in range(len(prompts))]
        served.extend(ids)
        N = max(map(len, ids))
        tokens = torch.tensor([i + [0] * (N - len(i)) for i in ids])
        return rollout.Generation(tokens, torch.zeros(tokens.shape), torch.tensor([len(i) for i in ids]),
                                  ["stop"] * len(ids))

    monkeypatch.setattr(rollout, "generate", fake_generate)
    res = evaluate(torch.nn.Linear(1, 1), tok, problems, PassAtKConfig(samples=2, greedy=False))
    assert [q["reflection"] for q in res["per_problem"]] == [1.0, 0.5, 0.0]
    assert res["reflection"]["mean"] == pytest.approx(0.5) and res["reflection"]["n"] == 3
    assert res["reflection"]["lo"] < 0.5 < res["reflection"]["hi"]
    assert any(row[0] == "reflection rate, %" for row in summary_rows(res))
