"""Rewards: hand-derived reference values, the DAPO formula written out independently, and fuzzing."""

import random
import time

import pytest

from nanoseek.errors import UserError
from nanoseek.sampling.rewards import RewardConfig, accuracy_reward, compute_rewards, format_reward, language_consistency, overlong_penalty
from nanoseek.tasks import Problem, sample_problems
from nanoseek.tasks.language import TO_ALT

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # hypothesis is optional: the seeded fuzz below always runs
    given = None


@pytest.mark.parametrize("text,expected", [
    ("<think>7 + 5 = 12</think><answer>12</answer>", 1.0),
    ("  \n<think>\nok\n</think>\n\n<answer> 12 </answer>\n", 1.0),
    ("<think>ok</think><answer>12</answer> trailing", 0.0),
    ("leading <think>ok</think><answer>12</answer>", 0.0),
    ("<think>ok</think> so <answer>12</answer>", 0.0),
    ("<answer>12</answer><think>ok</think>", 0.0),
    ("<think>ok</think>", 0.0),
    ("<answer>12</answer>", 0.0),
    ("<think>  </think><answer>12</answer>", 0.0),
    ("<think>ok</think><answer> </answer>", 0.0),
    ("<think>a<think>b</think><answer>12</answer>", 0.0),
    ("<think>ok</think><answer>1</answer><answer>2</answer>", 0.0),
    ("<think>ok<answer>1</answer></think>", 0.0),
    ("<think>ok</think></answer>x<answer>", 0.0),
    ("", 0.0),
])
def test_format_reward(text, expected):
    assert format_reward(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("7 + 5 = 12\n</think>\n<answer>12</answer>", 1.0),
    ("<think>7 + 5 = 12</think><answer>12</answer>", 0.0),  # a second <think> after the prompt's one
    ("</think><answer>12</answer>", 0.0),
])
def test_format_reward_inside_think(text, expected):
    assert format_reward(text, starts_in_think=True) == expected


def dapo_reference(n, l_max, l_cache):
    """DAPO eq. (13), written out case by case."""
    if n <= l_max - l_cache:
        return 0.0
    if n <= l_max:
        return ((l_max - l_cache) - n) / l_cache
    return -1.0


def test_overlong_penalty_against_formula():
    assert [overlong_penalty(n, 20, 4) for n in (0, 16, 17, 18, 20, 21, 10**9)] == [0, 0, -0.25, -0.5, -1, -1, -1]
    rng = random.Random(0)
    for _ in range(2000):
        l_max = rng.randint(1, 5000)
        l_cache = rng.randint(1, l_max)
        n = rng.randint(0, 6000)
        got = overlong_penalty(n, l_max, l_cache)
        assert got == pytest.approx(dapo_reference(n, l_max, l_cache), abs=1e-12)
        assert -1.0 <= got <= 0.0
    # L_cache = 0 is the hard limit: 0 up to L_max, -1 beyond
    assert overlong_penalty(100, 100, 0) == 0.0 and overlong_penalty(101, 100, 0) == -1.0


def test_language_consistency_reads_the_reasoning_only():
    alt = TO_ALT["carry"]
    # chain of thought: "add", "then", alt word, "done" -> 3 of 4 en; the answer's words do not count
    text = f"<think>add 1 + 2 then {alt} 1 done</think><answer>three three three</answer>"
    assert language_consistency(text) == pytest.approx(3 / 4)
    assert language_consistency(text, "alt") == pytest.approx(1 / 4)
    assert language_consistency(f"add then {alt} done\n</think><answer>3</answer>") == pytest.approx(3 / 4)
    assert language_consistency(f"no tags {alt} at all") == pytest.approx(4 / 5)
    assert language_consistency("<think>1 + 2 = 3</think><answer>3</answer>") == 0.0


def test_accuracy_reward_uses_the_task_verifier():
    for p in sample_problems(["arithmetic", "countdown", "linear"], 30, seed=1):
        assert accuracy_reward(p, p.completion()) == 1.0
        assert accuracy_reward(p, "<think>hmm</think><answer>-123456789</answer>") == 0.0
    gsm = Problem("gsm8k", "How many?", "1,200", "", 0, {})
    assert accuracy_reward(gsm, "<answer>1200</answer>") == 1.0
    math = Problem("math", "Half?", "\\frac{1}{2}", "", 0, {})
    assert accuracy_reward(math, "<answer>0.5</answer>") == 1.0 and accuracy_reward(math, "<answer>2</answer>") == 0.0


def test_accuracy_needs_the_answer_in_the_required_format():
    """R1 §2.2.2: the final answer must be given in the specified format; a right last number elsewhere (in
    truncated reasoning, inside <think>, untagged) earns nothing unless the lenient fallback is opted in."""
    arith = Problem("arithmetic", "What is 3 + 4?", "7", "", 1)
    gsm = Problem("gsm8k", "Cost?", "1,200", "", 0)
    countdown = Problem("countdown", "Make 128 from 100, 28.", "100 + 28", "", 2, {"numbers": [100, 28], "target": 128})
    for problem, unformatted in [(arith, "<think>3 + 4 = 7"),                              # truncated reasoning
                                 (arith, "<think>so <answer>7</answer></think>"),         # answer inside <think>
                                 (arith, "<think>3 + 4 = 7</think> the answer is 7"),     # untagged
                                 (gsm, "<think>600 * 2</think> so it costs 1200"),
                                 (countdown, "<think>try</think> 100 + 28")]:
        assert accuracy_reward(problem, unformatted) == 0.0, unformatted
        assert accuracy_reward(problem, unformatted, fallback=True) == 1.0, unformatted
        cfg = RewardConfig(answer_fallback=True)
        assert compute_rewards(cfg, problem, unformatted, 5)["accuracy"] == 1.0
        assert compute_rewards(RewardConfig(), problem, unformatted, 5)["accuracy"] == 0.0
    assert accuracy_reward(arith, "<think>3 + 4</think> <answer>7</answer>") == 1.0
    assert accuracy_reward(arith, "<answer>7</answer>") == 1.0                          # no reasoning at all: fine
    # the chat template on user data: the configured final-answer format, and only it
    boxed, hashes = "<think>600 * 2 = 1200</think> The cost is $\\boxed{1,200}$.", "600 * 2 = 1200\n#### 1200\n"
    assert accuracy_reward(gsm, boxed, "boxed") == 1.0 and accuracy_reward(gsm, boxed) == 0.0
    assert accuracy_reward(gsm, hashes, "gsm8k") == 1.0 and accuracy_reward(gsm, hashes, "boxed") == 0.0
    assert accuracy_reward(gsm, "<think>\\boxed{1200}</think> ok", "boxed") == 0.0     # boxed inside the reasoning
    assert compute_rewards(RewardConfig(answer_format="gsm8k"), gsm, hashes, 5)["accuracy"] == 1.0
    inside = RewardConfig(starts_in_think=True)      # the prompt opened <think>: an answer before </think> is in it
    assert compute_rewards(inside, arith, "3 + 4 <answer>7</answer>", 5)["accuracy"] == 0.0
    assert compute_rewards(inside, arith, "3 + 4 </think> <answer>7</answer>", 5)["accuracy"] == 1.0
    with pytest.raises(UserError, match="answer_format"):
        RewardConfig(answer_format="xml")


def test_countdown_rejects_anything_after_the_result():
    p = Problem("countdown", "Make 128 from 100, 28, 5.", "100 + 28", "", 3, {"numbers": [100, 28, 5], "target": 128})
    assert accuracy_reward(p, "<answer>100 + 28</answer>") == 1.0
    assert accuracy_reward(p, "<answer>100 + 28 = 128</answer>") == 1.0
    assert accuracy_reward(p, "<answer>100 + 28 = 128 = 5</answer>") == 0.0
    assert accuracy_reward(p, "<answer>100 + 28 = 5</answer>") == 0.0                   # a wrong stated result
    assert accuracy_reward(p, "<answer>100 + 28 = 128 + 5</answer>") == 0.0


def test_language_consistency_counts_every_script():
    """Words of any script count (R1 §2.3.3: the share of target-language words); CJK ideographs one word
    each, numerals (三 四 七 like 3 4 7) none; Latin-script words are en, the alt vocabulary alt."""
    assert language_consistency("<think>计算 三 加 四 等于 七 ok</think>", "en") == pytest.approx(1 / 6)
    assert language_consistency("<think>Сложим три и четыре, ok</think>", "en") == pytest.approx(1 / 4)
    assert language_consistency("<think>Сложим три и четыре, ok</think>", "alt") == 0.0
    assert language_consistency("<think>ok, すうじ を たす</think>", "en") == pytest.approx(1 / 7)
    assert language_consistency("<think>add the café numbers x 12</think>", "en") == 1.0
    alt = TO_ALT["carry"]
    assert language_consistency(f"<think>{alt} 计算 add</think>", "alt") == pytest.approx(1 / 4)
    assert language_consistency("<think>三 四 七 12 x</think>", "en") == 0.0               # numbers only: no words


def test_compute_rewards_weighted_sum():
    p = sample_problems("arithmetic", 1, seed=2)[0]
    cfg = RewardConfig(accuracy=1.0, format=0.5, language=0.25, overlong=2.0, max_tokens=100, cache_tokens=20)
    good = compute_rewards(cfg, p, p.completion(), n_tokens=90)
    assert good == {"accuracy": 1.0, "format": 1.0, "language": 1.0, "overlong": -0.5, "total": 1 + 0.5 + 0.25 - 1.0}
    alt = compute_rewards(cfg, p, p.completion("alt"), n_tokens=10)
    assert (alt["language"], alt["total"]) == (0.0, 1.5)
    p.meta["register"] = "alt"  # a problem can name its own target register
    assert compute_rewards(cfg, p, p.completion("alt"), n_tokens=10)["language"] == 1.0
    bare = compute_rewards(RewardConfig(answer_fallback=True), p, p.answer, n_tokens=10**6)  # no overlong penalty
    assert bare == {"accuracy": 1.0, "format": 0.0, "language": 0.0, "overlong": 0.0, "total": 1.0}
    assert compute_rewards(RewardConfig(), p, p.answer, 10)["accuracy"] == 0.0  # strict default: no answer tag
    inside = RewardConfig(starts_in_think=True)
    assert compute_rewards(inside, p, p.completion().removeprefix("<think>"), 5)["total"] == pytest.approx(1.2)


@pytest.mark.parametrize("kwargs", [{"register": "fr"}, {"max_tokens": -1}, {"max_tokens": 10, "cache_tokens": 11},
                                    {"max_tokens": 10, "cache_tokens": -1}])
def test_reward_config_validation(kwargs):
    with pytest.raises(UserError):
        RewardConfig(**kwargs)


PROBLEMS = sample_problems(["arithmetic", "countdown", "linear"], 3, seed=3) + [
    Problem("gsm8k", "q", "18", "", 0, {}), Problem("math", "q", "\\frac{1}{2}", "", 0, {})]
CFG = RewardConfig(language=0.1, max_tokens=64, cache_tokens=16)
ADVERSARIAL = [
    "", "<think>", "</think>" * 100_000, "<think>" * 3 + "</answer>", "9**9**9", "<answer>9**9**9</answer>",
    "<think>" + "x " * 500_000 + "</think><answer>" + "9" * 100_000 + "</answer>",
    "(" * 200_000 + ")" * 200_000, "<answer>\\boxed{" + "(" * 50 + "1" + ")" * 50 + "}</answer>",
    "<answer>" + "\\frac{1}{" * 30 + "2" + "}" * 30 + "</answer>", "<answer>\\boxed{9^{9^{9}}}</answer>",
    "<answer>((9^{99})^{99})^{99}</answer>", "\ud800\x00" * 100_000, "<answer>" + "1/" * 1000 + "1</answer>",
]


def check_all(text: str) -> None:
    assert format_reward(text) in (0.0, 1.0) and format_reward(text, starts_in_think=True) in (0.0, 1.0)
    assert 0.0 <= language_consistency(text) <= 1.0 and 0.0 <= language_consistency(text, "alt") <= 1.0
    for p in PROBLEMS:
        out = compute_rewards(CFG, p, text, n_tokens=len(text))
        assert out["accuracy"] in (0.0, 1.0) and -1.0 <= out["overlong"] <= 0.0
        assert out["total"] == pytest.approx(out["accuracy"] + 0.2 * out["format"] + 0.1 * out["language"]
                                             + out["overlong"])


def test_rewards_never_raise_or_hang_on_adversarial_strings():
    for text in ADVERSARIAL:
        start = time.perf_counter()
        check_all(text)
        assert time.perf_counter() - start < 3.0, text[:50]


def test_rewards_seeded_fuzz():
    rng = random.Random(0)
    pieces = ["<think>", "</think>", "<answer>", "</answer>", "\\boxed{", "{", "}", "(", ")", "12", "-", "*", "/",
              "^", "=", " ", "\n", TO_ALT["add"], "add", "x", "\\frac{1}{2}", "0.5"]
    start = time.perf_counter()
    for _ in range(300):
        if rng.random() < 0.3:
            text = rng.randbytes(rng.randint(0, 200)).decode("utf-8", errors="replace")
        else:
            text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 40)))
        check_all(text)
    assert time.perf_counter() - start < 20


if given is not None:
    @settings(max_examples=150, deadline=None)
    @given(st.text(max_size=300) | st.lists(st.sampled_from(["<think>", "</think>", "<answer>", "</answer>", "1",
                                                             "(", ")", "+", "\\boxed{", "}", "a b"]),
                                            max_size=40).map("".join))
    def test_rewards_hypothesis_fuzz(text):
        check_all(text)
else:
    @pytest.mark.skip(reason="hypothesis not installed; the seeded fuzz tests still ran")
    def test_rewards_hypothesis_fuzz():
        pass
