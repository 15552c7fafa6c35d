"""The pretraining corpus: task-family documents of mixed quality, so the base model knows the domain but
is imperfect — the starting point R1-Zero's RL needs (R1 report §2.2).

Every document comes from a TRAIN-split problem (asserted; test-split problems are what pass@1 measures).
A document is one of these kinds, drawn by the fractions in CorpusConfig:

    r1zero   the R1-Zero prompt, then reasoning, "</think> <answer> A </answer>"  (RL from the base has a
             format to reinforce; the base produces it only sometimes)
    think    "Question: Q\\n<think>\\nreasoning\\n</think>\\n<answer>A</answer>"
    plain    "Question: Q\\nSolution: reasoning\\nAnswer: A"                        (reasoning without tags)
    bare     "Question: Q\\nAnswer: A", or the R1-Zero prompt with an empty think    (no reasoning at all)
    general  non-reasoning Q&A ("Is 17 prime?"), the kind R1 §2.3.3 mixes into SFT

Quality knobs on task documents: `wrong` of them carry a plausible mistake — one digit of the final
answer changed, in the reasoning's last line too, checked wrong with the family's own verifier; `short`
keep only the last lines of the reasoning; `check` of them check every step by a second route, and `slip` of
those first write one step wrong and catch it ("check: 8 + 7 = 15, not 14" / "Wait, redo ..."): a
self-verification habit the base shows only sometimes, for RL to find that it pays. Language: `register` of them are written wholly in the second
register, `mixed` have only some reasoning lines switched — the language mixing that R1's
language-consistency reward (§2.3.2) later removes.

    cfg = CorpusConfig(n_documents=20_000, seed=0)
    docs = build_corpus(cfg)                  # list[Document(text, kind, family, correct, language)]
    general_examples(n, seed) -> list[{"prompt", "response"}]
    prepare_corpus(out_dir, cfg, tok) -> (out_dir/"train", out_dir/"val")   # token shards, reused when unchanged

Scale: a corpus is drawn in chunks of CHUNK_DOCUMENTS documents, generated (and, for shards, tokenised) in
`cfg.workers` processes; the documents do not depend on the worker count. A script that builds a corpus of more
than one chunk with workers > 1 guards its entry point with `if __name__ == "__main__":`, as multiprocessing asks.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import re
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nanoseek.data.shards import INDEX, encode_documents, load_index, tokenizer_fingerprint, write_shards
from nanoseek.errors import UserError
from nanoseek.recipe import to_dict
from nanoseek.tasks import Problem, get_family, sample_problems
from nanoseek.tasks.language import mix, render
from nanoseek.tokenizer import ANSWER, END_ANSWER, END_THINK, THINK, r1_zero_prompt

KINDS = ("r1zero", "think", "plain", "bare", "general")


@dataclass
class CorpusConfig:
    n_documents: int = 20_000         # training documents (~100 tokens each with the default tokenizer)
    val_documents: int = 500          # held-out documents for the validation loss (fresh draws, train split)
    families: list[str] = field(default_factory=lambda: ["arithmetic", "countdown", "linear"])
    difficulty: dict = field(default_factory=dict)  # {family: level}; unlisted families use their default range
    # kind mix (normalised to sum 1). Worked reasoning sits mostly in the "think" and "plain" surfaces, while the
    # R1-Zero template is mostly answered bare, as web Q&A answers without showing work: so the base reasons under
    # the R1-Zero prompt only now and then, has the skill from the other surfaces, and RL has a behaviour to find
    # (R1 §2.2.4: response length grows). docs/experiments.md has the runs behind these numbers.
    r1zero: float = 0.05
    think: float = 0.40
    plain: float = 0.25
    bare: float = 0.25
    general: float = 0.05
    # quality and language, as fractions of the task documents (more noise than this costs the tiny base skill)
    wrong: float = 0.10               # plausible mistakes (R1-Zero needs a base that is not always right)
    short: float = 0.10               # reasoning cut to its last lines
    check: float = 0.0                # reasoning that checks each step by a second route (TaskFamily.worked_solution)
    slip: float = 0.0                 # of the checking documents: one step first written wrong, caught by its check
                                      # and redone ("Wait, redo ..."): the self-verification R1-Zero's RL can amplify
    register: float = 0.05            # written wholly in the second ("alt") register, question included
    mixed: float = 0.05               # reasoning that switches register line by line
    bare_r1zero: float = 0.9          # share of bare documents in the R1-Zero template (an empty think), the rest
                                      # "Question/Answer": how often the R1-Zero prompt is answered without reasoning
    seed: int = 0
    workers: int | None = None        # processes generating the corpus: None = every core this process may use,
                                      # 0 or 1 = in this process. Not part of the corpus: any value gives the
                                      # same documents (they are drawn per fixed-size chunk, CHUNK_DOCUMENTS)

    def __post_init__(self) -> None:
        weights = [getattr(self, k) for k in KINDS]
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise UserError(f"corpus kind fractions {dict(zip(KINDS, weights))} must be >= 0 with a positive sum")
        for name in ("wrong", "short", "check", "slip", "register", "mixed", "bare_r1zero"):
            if not 0 <= getattr(self, name) <= 1:
                raise UserError(f"corpus.{name}={getattr(self, name)} must be a fraction in [0, 1]")
        if self.register + self.mixed > 1:
            raise UserError("corpus.register + corpus.mixed must be <= 1")
        if self.n_documents < 1 or self.val_documents < 0:
            raise UserError("corpus.n_documents must be >= 1 and corpus.val_documents >= 0")
        if self.workers is not None and self.workers < 0:
            raise UserError(f"corpus.workers={self.workers}: use 0 or 1 (in this process), more, or omit it "
                            "for every available core")


@dataclass
class Document:
    text: str
    kind: str                         # one of KINDS
    family: str                       # task family, or "general"
    correct: bool                     # False for the deliberate mistakes
    language: str                     # "en", "alt" or "mixed"
    problem: Problem | None = None    # the task problem it was written from (None for general text)


CHUNK_DOCUMENTS = 1 << 15    # documents per generation chunk; chunks are drawn independently (in parallel)


def build_corpus(cfg: CorpusConfig, part: str = "train") -> list[Document]:
    """`cfg.n_documents` documents for part "train", `cfg.val_documents` fresh ones for "val"; a pure
    function of (cfg, part) — `cfg.workers` changes only how fast. Both parts draw only TRAIN-split problems."""
    return [doc for chunk in _map_chunks(_chunk_documents, cfg, part) for doc in chunk]


def corpus_texts(cfg: CorpusConfig, part: str = "train") -> Iterator[tuple[list[str], dict]]:
    """build_corpus's texts, chunk by chunk, each with its counts {"kinds", "wrong", "languages"}: what shard
    writing needs, without sending the documents' problems between processes (unpickling them would cost the
    parent as much as generating them)."""
    return _map_chunks(_chunk_texts, cfg, part)


def _map_chunks(fn: Callable, cfg: CorpusConfig, part: str, *args) -> Iterator:
    """fn(cfg, part, chunk, size, *args) for each chunk of the part, in chunk order, over `cfg.workers` processes.

    A corpus of n documents is ceil(n / CHUNK_DOCUMENTS) chunks, every chunk full but the last, each seeded by
    (seed, part, chunk): so the documents are the same whatever the number of workers, and a corpus of at most
    CHUNK_DOCUMENTS documents is one chunk, drawn exactly as before chunking existed (every recipe up to 32K
    documents keeps its corpus bit for bit)."""
    n = cfg.n_documents if part == "train" else cfg.val_documents
    jobs = [(cfg, part, k, min(CHUNK_DOCUMENTS, n - start), *args)
            for k, start in enumerate(range(0, n, CHUNK_DOCUMENTS))]
    workers = min(resolve_workers(cfg.workers), len(jobs))
    if workers <= 1:
        return (fn(*job) for job in jobs)
    return _pool_map(fn, jobs, workers)


def resolve_workers(workers: int | None) -> int:
    """CorpusConfig.workers as a process count: None = the cores this process may run on (its affinity)."""
    if workers is not None:
        return max(workers, 1)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _pool_map(fn: Callable, jobs: list[tuple], workers: int) -> Iterator:
    """fn(*job) in `workers` processes, yielded in job order with at most 2·workers results in flight (memory
    holds a few chunks, not the corpus, when the consumer is slower). Forkserver: the workers start from a clean
    process that imported this module once, not from a fork of a parent that may hold CUDA or thread pools."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_one_thread_per_worker) as pool:
        pending = deque(pool.submit(fn, *job) for job in jobs[:2 * workers])
        for job in jobs[2 * workers:]:
            yield pending.popleft().result()
            pending.append(pool.submit(fn, *job))
        while pending:
            yield pending.popleft().result()


def _one_thread_per_worker() -> None:
    """The workers are the parallelism: the Rust tokenizer in each encodes on one thread (TOKENIZERS_PARALLELISM
    is read at every call), instead of every worker spawning a thread per core."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def corpus_tokens(cfg: CorpusConfig, part: str, tok) -> Iterator[tuple[list[tuple[np.ndarray, np.ndarray]], dict]]:
    """The part's documents as `encode_documents` batches (tokens, lengths), chunk by chunk, with the chunk's
    counts; each chunk is generated and encoded in one worker process, so this process only receives token
    arrays (with workers <= 1: here, the tokenizer's own threads spreading each batch over the cores)."""
    return _map_chunks(_chunk_tokens, cfg, part, tok)


def _chunk_tokens(cfg: CorpusConfig, part: str, chunk: int, n: int, tok) -> tuple[list, dict]:
    texts, counts = _chunk_texts(cfg, part, chunk, n)
    return list(encode_documents(texts, tok)), counts


def _chunk_texts(cfg: CorpusConfig, part: str, chunk: int, n: int) -> tuple[list[str], dict]:
    docs = _chunk_documents(cfg, part, chunk, n)
    return [d.text for d in docs], _counts(docs)


def _counts(docs: list[Document]) -> dict:
    """What a shard index records about its corpus: documents per kind and language, and how many are wrong."""
    return {"kinds": dict(Counter(d.kind for d in docs)), "wrong": sum(not d.correct for d in docs),
            "languages": dict(Counter(d.language for d in docs))}


def _chunk_documents(cfg: CorpusConfig, part: str, chunk: int, n: int) -> list[Document]:
    """The n documents of one chunk; chunk 0 keeps the seeds the unchunked corpus had."""
    where = (part,) if chunk == 0 else (part, f"chunk{chunk}")
    rng = random.Random(_subseed(cfg.seed, *where, "documents"))
    kinds = rng.choices(KINDS, weights=[getattr(cfg, k) for k in KINDS], k=n)
    n_task = sum(k != "general" for k in kinds)
    problems = iter(sample_problems(cfg.families, n_task, split="train", seed=_subseed(cfg.seed, *where, "problems"),
                                    difficulty=cfg.difficulty or None))
    general = iter(general_examples(n - n_task, _subseed(cfg.seed, *where, "general")))
    docs = []
    for kind in kinds:
        if kind == "general":
            g = next(general)
            docs.append(Document(f"Question: {g['prompt']}\nAnswer: {g['response']}", kind, kind, True, "en"))
            continue
        problem = next(problems)
        assert problem.split == "train", "a test-split problem reached the pretraining corpus"
        docs.append(_task_document(problem, kind, cfg, rng))
    return docs


def _task_document(problem: Problem, kind: str, cfg: CorpusConfig, rng: random.Random) -> Document:
    prompt, answer, reasoning = problem.prompt, problem.answer, problem.solution
    if cfg.check or cfg.slip:         # (a corpus without them keeps its random stream, document for document)
        checks = rng.random() < cfg.check
        reasoning = get_family(problem.family).worked_solution(problem, rng, checks, checks and rng.random() < cfg.slip)
    correct = rng.random() >= cfg.wrong
    if not correct:
        wrong = _plausible_mistake(problem, rng)
        if wrong is None:        # no digit to change (never for the built-in families)
            correct = True
        else:
            head, sep, last = reasoning.rpartition("\n")
            reasoning = head + sep + _replace_last(last, answer, wrong)   # the final step slips
            answer = wrong
    if rng.random() < cfg.short:
        reasoning = "\n".join(reasoning.split("\n")[-rng.randint(1, 2):])
    u = rng.random()
    language = "alt" if u < cfg.register else "mixed" if u < cfg.register + cfg.mixed else "en"
    if language == "alt":
        prompt, reasoning = render(prompt, "alt"), render(reasoning, "alt")
    elif language == "mixed":
        reasoning = mix(reasoning, rng, p_alt=0.5)
    if kind == "r1zero":
        text = f"{r1_zero_prompt(prompt)} {reasoning} {END_THINK} {ANSWER} {answer} {END_ANSWER}"
    elif kind == "think":
        text = f"Question: {prompt}\n{THINK}\n{reasoning}\n{END_THINK}\n{ANSWER}{answer}{END_ANSWER}"
    elif kind == "plain":
        text = f"Question: {prompt}\nSolution: {reasoning}\nAnswer: {answer}"
    elif rng.random() < cfg.bare_r1zero:   # bare, two surfaces
        text = f"{r1_zero_prompt(prompt)} {END_THINK} {ANSWER} {answer} {END_ANSWER}"
    else:
        text = f"Question: {prompt}\nAnswer: {answer}"
    if kind == "bare" and language == "mixed":   # no reasoning to mix
        language = "en"
    return Document(text, kind, problem.family, correct, language, problem)


def _plausible_mistake(problem: Problem, rng: random.Random) -> str | None:
    """The answer with one digit changed (off by a little, like a slipped carry), verified wrong."""
    family, answer = get_family(problem.family), problem.answer
    positions = [m.start() for m in re.finditer(r"\d", answer)]
    for _ in range(10 if positions else 0):
        i = rng.choice(positions)
        wrong = answer[:i] + str((int(answer[i]) + rng.choice([-2, -1, 1, 2])) % 10) + answer[i + 1:]
        if not re.search(r"(?<!\d)0\d", wrong) and family.score(problem, f"{ANSWER}{wrong}{END_ANSWER}") == 0.0:
            return wrong         # no leading zeros ("07"), and really wrong
    return None


def _replace_last(text: str, old: str, new: str) -> str:
    head, sep, tail = text.rpartition(old)
    return head + new + tail if sep else text


def _subseed(seed: int, *parts: str) -> int:
    """Independent, stable random streams per purpose (seed 1's train must not be seed 0's val)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}/{'/'.join(parts)}".encode(), digest_size=8).digest(), "big")


# ---- general (non-reasoning) data: R1 §2.3.3 mixes it into the final SFT; a little also goes into pretraining
_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen " \
        "seventeen eighteen nineteen".split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_NOUNS = "apple river stone garden window planet pencil rabbit candle forest bridge mirror ocean ladder".split()


def number_words(n: int) -> str:
    """0..999_999 in English words ("four hundred and two")."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
    if n < 1000:
        return _ONES[n // 100] + " hundred" + ("" if n % 100 == 0 else " and " + number_words(n % 100))
    return number_words(n // 1000) + " thousand" + ("" if n % 1000 == 0 else " " + number_words(n % 1000))


def _smallest_factor(n: int) -> int:
    return next((p for p in range(2, int(n ** 0.5) + 1) if n % p == 0), n)


def _general(rng: random.Random) -> tuple[str, str]:
    n, word = rng.randint(2, 999), rng.choice(_NOUNS)
    match rng.randrange(6):
        case 0:
            return f"Write the number {n} in words.", number_words(n) + "."
        case 1:
            p = _smallest_factor(n)
            return f"Is {n} prime?", f"Yes, {n} is prime." if p == n else f"No, {n} = {p} * {n // p}."
        case 2:
            return f"Is {n} even or odd?", f"{n} is {'odd' if n % 2 else 'even'}."
        case 3:
            m = rng.randint(2, 999)
            return (f"Which is larger, {n} or {m}?",
                    "They are equal." if n == m else f"{max(n, m)} is larger than {min(n, m)}.")
        case 4:
            return f"Spell the word {word} backwards.", word[::-1] + "."
        case _:
            return f"How many letters are in the word {word}?", f"The word {word} has {len(word)} letters."


def general_examples(n: int, seed: int = 0) -> list[dict]:
    """n short non-reasoning Q&A records {"prompt", "response"} (templated: numbers in words, primes, ...)."""
    rng = random.Random(seed)
    return [dict(zip(("prompt", "response"), _general(rng))) for _ in range(n)]


# ---- shards for a run
def prepare_corpus(out_dir: str | Path, cfg: CorpusConfig, tok, progress: bool = True) -> tuple[Path, Path]:
    """Token shards of the train and val corpora under out_dir/{train,val}, each written atomically and
    reused as is when built from the same config and tokenizer (so `--resume` does not rebuild them).
    Streamed: chunks are generated and tokenised in `cfg.workers` processes while this one writes the earlier
    ones, so memory holds a few chunks whatever the corpus size."""
    out_dir = Path(out_dir)
    config = corpus_identity(cfg)
    for part in ("train", "val"):
        path = out_dir / part
        if (path / INDEX).is_file():
            index = load_index(path)
            if corpus_identity(index["meta"].get("corpus")) == config and index["tokenizer"] == tokenizer_fingerprint(tok):
                continue
        if (cfg.n_documents if part == "train" else cfg.val_documents) < 1:
            raise UserError(f"the {part} corpus is empty; set corpus.{'n' if part == 'train' else 'val'}_documents > 0")
        counts = {"kinds": Counter(), "wrong": 0, "languages": Counter()}     # filled as the texts stream past
        write_shards(_counted_batches(cfg, part, tok, counts), tok, path, encoded=True, progress=progress,
                     meta=lambda: {"corpus": config, "part": part, **counts})
    return out_dir / "train", out_dir / "val"


def _counted_batches(cfg: CorpusConfig, part: str, tok, counts: dict) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for batches, c in corpus_tokens(cfg, part, tok):
        counts["kinds"].update(c["kinds"])
        counts["wrong"] += c["wrong"]
        counts["languages"].update(c["languages"])
        yield from batches


def corpus_identity(config) -> dict | None:
    """The corpus settings that decide its documents (a CorpusConfig or its stored dict): all but `workers`."""
    config = to_dict(config) if isinstance(config, CorpusConfig) else config
    return None if config is None else {k: v for k, v in config.items() if k != "workers"}
