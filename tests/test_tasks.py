"""Task families, the safe expression parser, the train/test split, registers and the JSONL loaders.

References are computed independently of nanoseek: Python's own Fraction arithmetic on trusted text the
test writes (never on model-like output), integer arithmetic on the problem's parameters, and the GSM8K file.
"""

import json
import random
import re
import time
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest

from nanoseek.errors import UserError
from nanoseek.tasks import FAMILIES, get_family, sample_problems, split_of
from nanoseek.tasks.expr import MAX_EXPR_CHARS, ExprError, evaluate, parse_number
from nanoseek.tasks.jsonl import answers_match, last_boxed, load_jsonl_problems
from nanoseek.tasks.language import EN_WORDS, TO_ALT, language_share, mix, render

GSM8K = Path(__file__).parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"
SAFE = re.compile(r"[\d\s+\-*/()]+")


def ref_eval(text: str) -> Fraction:
    """Python's evaluator with every literal a Fraction: an independent reference for trusted test text."""
    assert SAFE.fullmatch(text), text
    return eval(re.sub(r"\d+", lambda m: f"Fraction({m.group(0)})", text), {"Fraction": Fraction})


def random_expression(rng: random.Random, depth: int) -> str:
    if depth == 0 or rng.random() < 0.3:
        return str(rng.randint(0, 999))
    op = rng.choice("+-*/")
    left, right = random_expression(rng, depth - 1), random_expression(rng, depth - 1)
    text = f"{left} {op} {right}"
    return f"({text})" if rng.random() < 0.5 else text


# ---- safe parser ----------------------------------------------------------------------------------------

def test_evaluate_matches_python_fraction_arithmetic():
    rng = random.Random(0)
    checked = 0
    for _ in range(2000):
        text = random_expression(rng, 4)
        if len(text) > MAX_EXPR_CHARS:
            continue
        try:
            expected = ref_eval(text)
        except ZeroDivisionError:
            with pytest.raises(ExprError):
                evaluate(text)
            continue
        value, literals = evaluate(text)
        assert value == expected, text
        assert literals == [int(t) for t in re.findall(r"\d+", text)]
        checked += 1
    assert checked > 1000


@pytest.mark.parametrize("text,value", [("2+3*4", 14), ("(2+3)*4", 20), ("7-3-2", 2), ("64/4/2", 8),
                                        ("8/3", Fraction(8, 3)), ("-(3-5)", 2), ("6 × 7 ÷ 2", 21), ("−4+1", -3)])
def test_evaluate_precedence_and_symbols(text, value):
    assert evaluate(text)[0] == value


@pytest.mark.parametrize("text", ["9**9**9", "2^3", "1/0", "(1+2", "1+", "", "abc", "1e5", "3.5", "2 3",
                                  "(" * 40 + "1" + ")" * 40, "1" * 13, "1+" * 150 + "1", "__import__('os')"])
def test_evaluate_rejects(text):
    with pytest.raises(ExprError):
        evaluate(text)


@pytest.mark.parametrize("text,value", [("42", 42), ("-7", -7), ("+3", 3), ("1,234", 1234), ("3.50", Fraction(7, 2)),
                                        ("7/2", Fraction(7, 2)), (" 12 ", 12)])
def test_parse_number_accepts(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize("text", ["1e999999999", "12,34", "1/0", "x", "", "1" * 41, "NaN", "inf", "0x10", "1_000"])
def test_parse_number_rejects(text):
    assert parse_number(text) is None


# ---- families -------------------------------------------------------------------------------------------

def reference_answer(problem) -> Fraction:
    """The answer recomputed from the problem's parameters, not from its solution text."""
    m = problem.meta
    if problem.family == "arithmetic":
        return Fraction({"+": m["a"] + m["b"], "-": m["a"] - m["b"], "*": m["a"] * m["b"]}[m["op"]])
    if problem.family == "linear":  # a·x + b = d·x + e  =>  x = (e - b) / (a - d)
        return Fraction(m["e"] - m["b"], m["a"] - m["d"])
    return Fraction(m["target"])


def all_problems(per_level: int = 40, seed: int = 0):
    rng = random.Random(seed)
    return [fam.generate(rng, d) for fam in FAMILIES.values() for d in fam.difficulties for _ in range(per_level)]


def test_reference_answers_are_right_and_score_one():
    for p in all_problems():
        if p.family == "countdown":
            value = ref_eval(p.answer)
            used = Counter(int(t) for t in re.findall(r"\d+", p.answer))
            assert value == p.meta["target"] and not used - Counter(p.meta["numbers"]), p
            assert 1 <= p.meta["target"] <= 999 and p.meta["target"] not in p.meta["numbers"]
            assert len(p.meta["numbers"]) == p.difficulty
        else:
            assert Fraction(p.answer) == reference_answer(p), p
        assert p.solution.splitlines()[-1].startswith("So ") and f"= {p.meta.get('target', p.answer)}." in p.solution
        family = get_family(p.family)
        assert family.score(p, p.completion()) == 1.0
        assert family.score(p, p.completion("alt")) == 1.0
        assert family.score(p, p.answer, fallback=True) == 1.0  # bare answer: the (opt-in) last-candidate fallback
        assert family.score(p, p.answer) == 0.0                 # strict: no <answer>, no credit


def test_wrong_answers_score_zero():
    for p in all_problems(10, seed=1):
        family = get_family(p.family)
        if p.family == "countdown":
            numbers, target = p.meta["numbers"], p.meta["target"]
            wrong = [" + ".join(map(str, numbers)) if sum(numbers) != target else " * ".join(map(str, numbers)),
                     f"{target}", f"{p.answer} + {numbers[0]}", f"({p.answer}) * 1 * 1"]
            if p.answer.count(str(max(numbers))) == 1:  # a number not given: swap one literal
                wrong.append(p.answer.replace(str(max(numbers)), str(max(numbers) + 1000), 1))
        else:
            wrong = [str(int(p.answer) + 1), str(-int(p.answer) - 1), ""]
        for w in wrong:
            if w and p.family == "countdown" and ref_eval(w) == target and not (
                    Counter(map(int, re.findall(r"\d+", w))) - Counter(numbers)):
                continue  # happens to be a valid alternative solution
            assert family.score(p, f"<think>ok</think><answer>{w}</answer>") == 0.0, (p, w)


def test_every_equation_in_a_solution_is_true():
    """Each "lhs = rhs" of plain arithmetic inside a worked solution holds (checked with Python's Fractions)."""
    left_re, right_re = re.compile(r"[\d\s+\-*/()]+$"), re.compile(r"^[\d\s+\-*/()]+")
    checked = Counter()
    for p in all_problems(20, seed=2):
        for line in p.solution.splitlines():
            parts = line.split("=")
            for lhs, rhs in zip(parts, parts[1:]):
                left, right = left_re.search(lhs), right_re.search(rhs)
                if not left or not right or not re.match(r"\s*(\d|\(|-\d)", left.group(0)):
                    continue  # "7x - 12 = ...": the left side is not plain arithmetic
                assert ref_eval(left.group(0)) == ref_eval(right.group(0)), (line, p)
                checked[p.family] += 1
    assert min(checked[name] for name in FAMILIES) > 200, checked


def test_column_methods_write_the_result():
    rng = random.Random(3)
    for d in range(1, 8):
        for _ in range(30):
            p = FAMILIES["arithmetic"].generate(rng, d)
            a, b, op = p.meta["a"], p.meta["b"], p.meta["op"]
            lines = p.solution.splitlines()
            if op in "+-":
                written = re.findall(r"write (?:the last carry )?(\d+)", p.solution)
                assert int("".join(reversed(written))) == reference_answer(p)
                assert len([ln for ln in lines if ln.startswith("column")]) == len(str(max(a, b)))
            else:  # "a * d = p" or "a * d = p, shifted by k: p·10^k", one line per digit of b
                partials = [int(re.split(r"= |: ", ln)[-1]) for ln in lines[1:1 + len(str(b))]]
                assert partials == [a * int(c) * 10**k for k, c in enumerate(reversed(str(b)))]


def test_generation_is_seeded_and_difficulty_checked():
    for fam in FAMILIES.values():
        d = fam.default_difficulties[0]
        assert fam.generate(random.Random(5), d) == fam.generate(random.Random(5), d)
        with pytest.raises(UserError):
            fam.generate(random.Random(0), fam.difficulties[-1] + 1)
    assert sample_problems(["linear", "countdown"], 20, seed=3) == sample_problems("linear, countdown", 20, seed=3)
    assert sample_problems("linear", 20, seed=3) != sample_problems("linear", 20, seed=4)
    assert {p.difficulty for p in sample_problems("arithmetic", 30, difficulty=5)} == {5}
    assert {p.difficulty for p in sample_problems(["arithmetic", "countdown"], 30, difficulty={"countdown": 6})
            if p.family == "countdown"} == {6}
    for bad in (lambda: sample_problems("chess", 1), lambda: sample_problems([], 1),
                lambda: sample_problems("linear", 1, split="dev"), lambda: get_family("chess")):
        with pytest.raises(UserError):
            bad()


def test_train_and_test_never_coincide():
    names = list(FAMILIES)
    levels = {"arithmetic": 1, "countdown": 2, "linear": 1}  # a few hundred problems each: a leak would show
    train = sample_problems(names, 3000, "train", seed=0, difficulty=levels)
    test = sample_problems(names, 900, "test", seed=0, difficulty=levels)
    train_keys = {(p.family, p.prompt) for p in train}
    test_keys = {(p.family, p.prompt) for p in test}
    assert len(test_keys) > 50 and not train_keys & test_keys
    assert all(p.split == "train" for p in train) and all(p.split == "test" for p in test)
    assert Counter(p.family for p in test) == {n: 300 for n in names}
    # the split is ~10% of problems, a property of the text alone (same answer for any seed or process)
    raw = all_problems(50, seed=9)
    share = sum(split_of(p.family, p.prompt) == "test" for p in raw) / len(raw)
    assert 0.06 < share < 0.14, share
    assert split_of("arithmetic", "What is 2 + 2?") == split_of("arithmetic", "What is 2 + 2?")


def test_extract_answer_conventions():
    arith, countdown = FAMILIES["arithmetic"], FAMILIES["countdown"]
    assert arith.extract_answer("<answer>1</answer> then <answer>x = 12</answer> 99") == "12"
    assert arith.extract_answer("so 7-3 is 4", fallback=True) == "4"
    assert arith.extract_answer("The total is 1,234.", fallback=True) == "1,234"
    assert arith.extract_answer("x = -6", fallback=True) == "-6"
    assert arith.extract_answer("no digits", fallback=True) is None
    assert countdown.extract_answer("<answer>(50 + 25) + 6 = 81</answer>") == "(50 + 25) + 6"
    assert countdown.extract_answer("try 3 + 4 = 7\nSo (50 - 25) * 3 + 6 = 81.", fallback=True) == "(50 - 25) * 3 + 6"


ADVERSARIAL = [
    "", "<answer>", "</answer>", "<answer></answer>", "<answer>" * 10000, "9**9**9", "<answer>9**9**9</answer>",
    "<answer>" + "9" * 100_000 + "</answer>", "9" * 1_000_000, "(" * 100_000 + "1" + ")" * 100_000,
    "<answer>" + "(" * 5000 + "1" + ")" * 5000 + "</answer>", "1+" * 500_000 + "1", "-" * 1_000_000 + "1",
    "<answer>1e999999999</answer>", "\\boxed{" * 10000, "\\boxed{9^{9^{9^{9}}}}", "<answer>\\boxed{" + "{" * 1000,
    "<answer>" + "\\frac{1}{" * 200 + "}" * 200 + "</answer>", "x" * 1_000_000, "\x00\xff\ud800" * 1000,
    "<think>" + "a " * 500_000 + "</think><answer>5</answer>",
]


def fuzz_strings(n: int, seed: int = 0):
    rng = random.Random(seed)
    pieces = ["<answer>", "</answer>", "<think>", "</think>", "\\boxed{", "}", "(", ")", "=", "9" * 50, "**",
              "^", "-", "/", "0", " ", "\n", "x", "1,000", ".", "\\frac{", "#### 4"]
    for _ in range(n):
        if rng.random() < 0.5:
            yield rng.randbytes(rng.randint(0, 300)).decode("utf-8", errors="replace")
        else:
            yield "".join(rng.choice(pieces) for _ in range(rng.randint(0, 60)))


def test_score_never_raises_or_hangs():
    problems = [fam.generate(random.Random(0), fam.default_difficulties[0]) for fam in FAMILIES.values()]
    problems.append(load_jsonl_problems_text('{"question": "q", "answer": "#### 18"}')[0])
    start = time.perf_counter()
    for p in problems:
        family = get_family(p.family)
        for text in ADVERSARIAL:
            t = time.perf_counter()
            assert family.score(p, text) in (0.0, 1.0)
            assert time.perf_counter() - t < 1.0, (p.family, text[:40])
        for text in fuzz_strings(300):
            assert family.score(p, text) in (0.0, 1.0)
            assert family.score(p, f"<answer>{text}</answer>") in (0.0, 1.0)
            for answer_format, fallback in (("boxed", False), ("gsm8k", False), ("answer_tag", True)):
                assert family.score(p, text, answer_format, fallback) in (0.0, 1.0)
            answers = [family.extract_answer(text, fallback=True), family.extract_answer(p.completion())]
            assert all(family.same_answer(p, a, b) in (True, False) for a in answers if a for b in answers if b)
    assert time.perf_counter() - start < 15


# ---- registers ------------------------------------------------------------------------------------------

def test_registers_cover_the_templates_and_round_trip():
    assert not set(TO_ALT.values()) & set(EN_WORDS) and len(set(TO_ALT.values())) == len(EN_WORDS)
    for p in all_problems(5, seed=4):
        for text in (p.prompt, p.solution):
            words = {w.lower() for w in re.findall(r"[A-Za-z]{2,}", text)}
            assert words <= set(EN_WORDS), words - set(EN_WORDS)
            alt = render(text, "alt")
            assert render(alt, "en") == text
            assert language_share(text, "en") == 1.0 and language_share(alt, "alt") == 1.0
            assert language_share(alt, "en") == 0.0


def test_language_share_counts_words():
    alt_add, alt_carry = TO_ALT["add"], TO_ALT["carry"]
    # 5 counted words (the "x" and the tags are not words): 2 alt, 3 en
    text = f"<think>{alt_add.capitalize()} 4 + 9, {alt_carry} 1, hmm the x write</think>"
    assert language_share(text, "alt") == pytest.approx(2 / 5)
    assert language_share(text, "en") == pytest.approx(3 / 5)
    assert language_share("12 + 7 = 19", "en") == 0.0
    lines = "\n".join(["Add 1 + 2 column by column from the right."] * 200)
    mixed = mix(lines, random.Random(0), 0.3)
    alt_lines = sum(ln != lines.splitlines()[0] for ln in mixed.splitlines())
    assert 30 < alt_lines < 90 and language_share(mixed, "alt") == pytest.approx(alt_lines / 200)


# ---- JSONL loaders and math-verify ----------------------------------------------------------------------

def load_jsonl_problems_text(text: str):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "data.jsonl"
        path.write_text(text, encoding="utf-8")
        return load_jsonl_problems(path)


def test_jsonl_conventions():
    rows = [
        {"question": "How many?", "answer": "First 2 * 3 = <<2*3=6>>6.\n#### 1,200"},
        {"problem": "Half?", "solution": "It is $\\boxed{\\frac{1}{2}}$.", "level": "Level 3", "type": "Algebra"},
        {"prompt": "Set?", "answer": "\\boxed{\\{1, 2\\}}"},
        {"question": "Plain", "answer": 42},
    ]
    problems = load_jsonl_problems_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert [(p.family, p.answer) for p in problems] == [
        ("gsm8k", "1,200"), ("math", "\\frac{1}{2}"), ("math", "\\{1, 2\\}"), ("jsonl", "42")]
    assert problems[0].solution == "First 2 * 3 = 6." and problems[1].difficulty == 3
    gsm, half, pair, plain = problems
    score = get_family("math").score
    assert score(gsm, "<answer>1200</answer>") == 1.0 and score(gsm, "so \\boxed{1,200} dollars", "boxed") == 1.0
    assert score(gsm, "<answer>1201</answer>") == 0.0
    assert score(half, "<answer>0.5</answer>") == 1.0 and score(half, "$\\boxed{\\dfrac12}$", "boxed") == 1.0
    assert score(half, "<answer>1/3</answer>") == 0.0
    assert score(pair, "<answer>\\{2, 1\\}</answer>") == 1.0 and score(pair, "<answer>\\{1, 3\\}</answer>") == 0.0
    assert score(plain, "The answer is 42.", fallback=True) == 1.0
    assert last_boxed("a \\boxed{x^{2}} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert answers_match("18", "\\frac{36}{2}") and not answers_match("18", "9^{9^{9}}")


@pytest.mark.parametrize("text,where", [
    ('{"question": "q", "answer": "1"}\n{"question": "q", "answer": \n', "data.jsonl:2"),
    ('{"question": "q", "answer": "1"}\n[1, 2]\n', "data.jsonl:2"),
    ('{"answer": "1"}\n', "data.jsonl:1"),
    ('\n{"question": "q"}\n', "data.jsonl:2"),
    ('{"question": "q", "solution": "no box"}\n', "data.jsonl:1"),
    ("", "empty"), ("\n  \n", "empty"),
])
def test_jsonl_errors_name_file_and_line(text, where):
    with pytest.raises(UserError, match=where):
        load_jsonl_problems_text(text)


def test_jsonl_missing_file(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_jsonl_problems(tmp_path / "nope.jsonl")


@pytest.mark.skipif(not GSM8K.is_file(), reason=f"GSM8K copy not found at {GSM8K} (../shared next to the checkout)")
def test_real_gsm8k():
    problems = load_jsonl_problems(GSM8K)
    assert len(problems) == sum(1 for line in GSM8K.read_text().splitlines() if line.strip())
    assert all(p.family == "gsm8k" and parse_number(p.answer) is not None for p in problems)
    assert all("####" not in p.solution and "<<" not in p.solution for p in problems)
    family = get_family("gsm8k")
    for p in random.Random(0).sample(problems, 50):
        gold = parse_number(p.answer)
        assert family.score(p, f"<think>{p.solution}</think>\n<answer>{p.answer}</answer>") == 1.0
        assert family.score(p, f"{p.solution}\nThe answer is $\\boxed{{{p.answer}}}$.", "boxed") == 1.0
        assert family.score(p, f"<answer>{gold + 1}</answer>") == 0.0
        assert family.score(p, f"<answer>{p.answer}</answer> wait, <answer>{gold * 2 + 1}</answer>") == 0.0


# ---- worked solutions that check their steps (the corpus's self-verification) ---------------------------

_CHECK_SUM = re.compile(r"check: ([\d +*]+?) = (\d+)(?:, not (\d+))?$")


def test_checked_solutions_compute_every_check_right_and_end_at_the_answer():
    """Every "check: expr = v" line is true arithmetic; without a slip no check disagrees; with one, exactly
    one step is written wrong, its check names the wrong value, a "Wait, redo" line fixes it, and the
    solution still ends at the right answer (scored 1.0 as a completion)."""
    rng = random.Random(0)
    for p in sample_problems(["arithmetic", "linear"], 300, seed=5, difficulty=None):
        family = FAMILIES[p.family]
        for slip in (False, True):
            text = family.worked_solution(p, rng, check=True, slip=slip)
            lines = text.split("\n")
            assert lines[-1] == p.solution.split("\n")[-1]                       # "So ... = answer."
            assert family.score(p, f"<think>\n{text}\n</think>\n<answer>{p.answer}</answer>") == 1.0
            redo = [i for i, line in enumerate(lines) if line.startswith("Wait, redo")]
            flagged = [line for line in lines if ", not " in line]
            assert len(redo) == len(flagged) == int(slip)
            for line in lines:
                if m := _CHECK_SUM.match(line):      # arithmetic checks: the value is the expression's
                    assert eval(m.group(1)) == int(m.group(2)), line
                    assert m.group(3) is None or int(m.group(3)) != int(m.group(2))
            if p.family == "linear":                 # the substitution check at the true x comes last
                x = int(p.answer)
                assert lines[-2].startswith("Check:") and (f"({x})" if x < 0 else f" {x} ") in lines[-2], lines
            words = {w.lower() for w in re.findall(r"[A-Za-z]{2,}", text)}
            assert words <= set(EN_WORDS), words - set(EN_WORDS)


def test_unchecked_linear_solution_drops_the_check_and_countdown_keeps_its_search():
    rng = random.Random(1)
    lin = sample_problems(["linear"], 20, seed=6)
    assert all("Check:" not in FAMILIES["linear"].worked_solution(p, rng, False, False) for p in lin)
    assert all(FAMILIES["linear"].worked_solution(p, rng, True, False) == p.solution for p in lin)
    cd = sample_problems(["countdown"], 5, seed=6)
    assert all(FAMILIES["countdown"].worked_solution(p, rng, True, True) == p.solution for p in cd)

