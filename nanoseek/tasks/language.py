"""Two "language" registers for reasoning text, so that language mixing is observable (R1 §2.3.3).

R1-Zero's chains of thought mixed languages; R1 fixed it with a reward for the share of chain-of-thought
words in the target language. At our scale the second language is made up: every connecting word of the
task templates ("add", "carry", "both", "sides", ...) has a fixed pseudo-word ("add" -> something like
"zoq") in the "alt" register; numbers and symbols are shared, as digits are across human languages. So a
solution can be rendered in "en", in "alt", or mixed line by line (the corpus does that), answers and
verifiers are unaffected, and `language_share` measures which register a text reasons in.

Counting rule (R1 §2.3.3: the proportion of target-language words in the chain of thought), over every
script: a word is a run of two or more Unicode letters (regex `\\w` without digits and "_"; the unknown "x"
and the reasoning tags are not words), except in Chinese and Japanese, which write no spaces between
words: there each ideograph or kana is one word (a run of them would count a whole sentence as one word).
Numerals are numbers, not words, in every script (三, 四 and 七 like 3, 4 and 7). A word is "alt" if it is
in the closed alt vocabulary, "en" if it is otherwise in Latin script (so GSM8K text and a model's "hmm" are
en), and of neither register in any other script (Cyrillic, Greek, Han, ...). So
`language_share("计算 三 加 四 等于 七 ok", "en")` is 1/6: 计 算 加 等 于 are five words, ok the sixth.
"""

from __future__ import annotations

import hashlib
import random
import re
import unicodedata

from nanoseek.errors import UserError

REGISTERS = ("en", "alt")
MAX_SCAN_CHARS = 200_000  # language_share reads at most this many characters

# Every word of the task prompts and worked solutions (tests check that generated text uses no other).
EN_WORDS = (
    "add and at below borrow both by carry check column digit divide each for from is last left make most "
    "multiply no not number numbers of once parentheses parts redo right shifted sides so solve subtract target "
    "ten that the to try use wait what write zero"
).split()


def _pseudo_word(word: str, salt: int) -> str:
    """A deterministic made-up word: consonant-vowel syllables and a final k/q/x/z ("zoq", "bemutax")."""
    h = hashlib.blake2b(f"{word}/{salt}".encode(), digest_size=16).digest()
    syllables = "".join("bdfgklmnprstvz"[h[2 * i] % 14] + "aeiou"[h[2 * i + 1] % 5]
                        for i in range(1 + len(word) // 4))
    return syllables + "kqxz"[h[-1] % 4]


def _alt_vocabulary() -> dict[str, str]:
    table: dict[str, str] = {}
    for word in EN_WORDS:
        salt = 0
        while (alt := _pseudo_word(word, salt)) in table.values() or alt in EN_WORDS:
            salt += 1
        table[word] = alt
    return table


TO_ALT = _alt_vocabulary()
TO_EN = {alt: en for en, alt in TO_ALT.items()}
_WORD = re.compile(r"[A-Za-z]+")
# Hiragana, katakana, CJK unified ideographs (extension A, the main block, compatibility, extensions B+).
_CJK = "\u3041-\u3096\u30a1-\u30fa\u30fc\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
_COUNTED_WORD = re.compile(f"[{_CJK}]|[^\\W\\d_{_CJK}]{{2,}}")
_TAGS = re.compile(r"</?(?:think|answer)>|<\|[a-z_]+\|>")


def render(text: str, register: str = "en") -> str:
    """Translate every vocabulary word of `text` into `register`; other words and all symbols unchanged."""
    if register not in REGISTERS:
        raise UserError(f"unknown language register {register!r}; choose one of {', '.join(REGISTERS)}")
    table = TO_ALT if register == "alt" else TO_EN

    def swap(m: re.Match) -> str:
        word = m.group(0)
        out = table.get(word.lower())
        if out is None:
            return word
        return out.capitalize() if word[0].isupper() else out

    return _WORD.sub(swap, text)


def mix(text: str, rng: random.Random, p_alt: float) -> str:
    """Render each line in "alt" with probability p_alt, else in "en" (language mixing inside reasoning)."""
    return "\n".join(render(line, "alt" if rng.random() < p_alt else "en") for line in text.split("\n"))


def word_register(word: str) -> str | None:
    """"alt" for a word of the alt vocabulary, "en" for another Latin-script word, None for other scripts."""
    if word.lower() in TO_EN:
        return "alt"
    latin = word.isascii() or all(unicodedata.name(c, "").startswith("LATIN") for c in word)
    return "en" if latin else None


def language_share(text: str, register: str = "en") -> float:
    """Fraction of the words of `text` in `register` (counting rule: module doc); 0.0 for a text without
    words. Never raises."""
    words = [w for w in _COUNTED_WORD.findall(_TAGS.sub(" ", text[:MAX_SCAN_CHARS])) if not w.isnumeric()]
    if not words:
        return 0.0
    return sum(word_register(w) == register for w in words) / len(words)
