"""Byte-level BPE tokenizer, Hugging Face files, and the chat formats.

    tok = Tokenizer.train(texts, vocab_size=1024)      # byte-level BPE, digits split one by one
    tok.save(dir)                                      # tokenizer.json + tokenizer_config.json (with chat_template)
    tok = Tokenizer.load(dir)                          # ANY HF tokenizer.json (+ tokenizer_config.json when present)
    tok.encode(text) -> list[int]                      # never adds bos/eos: callers place them
    tok.encode_batch(texts) -> list[list[int]]
    tok.encode_offsets(text) -> (ids, [(start, end) character span per token])
    tok.decode(ids, skip_special_tokens=False) -> str
    len(tok) == tok.vocab_size                         # max id + 1: the embedding rows a model needs
    tok.bos_id (may be None for user tokenizers), tok.eos_id, tok.pad_id (falls back to eos)
    tok.eos_ids                                        # every id that ends a completion (generation config, template)
    tok.token_id("<think>") -> int | None              # None when the string is not one token
    tok.apply_chat_template(messages, add_generation_prompt=True) -> str
    render_chat(messages, add_generation_prompt=True) -> str   # our format without a tokenizer (the corpus)
    r1_zero_prompt(question) -> str                    # the R1-Zero template (R1 report §2.2.1), ends in "<think>"
    check_vocab_fits(tok_vocab_size, model_vocab_size) # UserError when the model's embedding is too small

Why these choices:
- Byte-level: any string encodes, nothing is ever <unk>; decoding is exact.
- Digits are pre-split one per token (" 1" "2" "3", as LLaMA/DeepSeek do): the tasks are arithmetic, and a
  model that sees "123" as one opaque token cannot learn carries.
- Special tokens get the first ids (0..9, fixed order) so every tokenizer we train agrees on them. The
  reasoning tags are single tokens but NOT "special" in the HF sense: `decode(skip_special_tokens=True)`
  keeps them, as DeepSeek-R1's tokenizer does, because rewards parse them.
- The chat template is one Jinja string, rendered by us with jinja2 exactly as transformers renders it, so
  `AutoTokenizer.from_pretrained(dir).apply_chat_template` gives the same ids. Our format is compact:
  `<|bos|><|system|>S<|user|>Q<|assistant|>A<|eos|><|user|>...`; each assistant turn ends in eos.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

from nanoseek.errors import UserError
from nanoseek.files import atomic_dir

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
USER, ASSISTANT, SYSTEM = "<|user|>", "<|assistant|>", "<|system|>"
THINK, END_THINK, ANSWER, END_ANSWER = "<think>", "</think>", "<answer>", "</answer>"
SPECIAL_TOKENS = [BOS, EOS, PAD, THINK, END_THINK, ANSWER, END_ANSWER, USER, ASSISTANT, SYSTEM]
TAG_TOKENS = {THINK, END_THINK, ANSWER, END_ANSWER}  # single tokens, kept by skip_special_tokens

# Our chat format. Roles map to role tokens; an assistant turn ends in eos (the stop token of generation).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

# R1-Zero template (R1 report §2.2.1, Table 1): the base model continues after "<think>".
R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The User asks a question and the Assistant solves it. "
    "The Assistant first thinks about the reasoning process and then gives the answer. The reasoning "
    "process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, "
    "i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
    "User: {prompt} Assistant: <think>"
)

# GPT-2's pre-tokenizer split with one change: numbers are cut into single digits (" ?\p{N}" instead of
# " ?\p{N}+"), a leading space kept with its first digit. One regex pass (it is the slow part of encoding).
_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)   # every byte + the special tokens
_GUESS_BOS = ("<|bos|>", "<s>", "<|begin_of_text|>", "<bos>", "[BOS]", "<|startoftext|>")
_GUESS_EOS = ("<|eos|>", "</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "[EOS]", "<|im_end|>")
_GUESS_PAD = ("<|pad|>", "<pad>", "[PAD]")


def r1_zero_prompt(question: str) -> str:
    """The R1-Zero prompt for `question`; the completion continues the reasoning after "<think>"."""
    return R1_ZERO_TEMPLATE.format(prompt=question)


def check_vocab_fits(tok_vocab_size: int, model_vocab_size: int) -> None:
    if tok_vocab_size > model_vocab_size:
        raise UserError(f"tokenizer has {tok_vocab_size} tokens but the model's vocab_size is {model_vocab_size}; "
                        f"set model.vocab_size >= {tok_vocab_size} or train a tokenizer with --vocab-size "
                        f"{model_vocab_size}")


def _token_name(value) -> str | None:
    """tokenizer_config.json stores a special token as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


@dataclass
class Tokenizer:
    backend: tokenizers.Tokenizer = field(repr=False)  # the Rust tokenizer: model, pre-tokenizer, added tokens
    bos_token: str | None = BOS
    eos_token: str | None = EOS
    pad_token: str | None = PAD
    chat_template: str = CHAT_TEMPLATE
    source: str = "<trained>"        # where it was loaded from, for error messages
    extra_config: dict = field(default_factory=dict)  # other tokenizer_config.json keys, written back on save
    generation_config: dict = field(default_factory=dict)  # the folder's generation_config.json (a checkpoint's),
                                     # kept so its eos ids end completions and travel with the run's exports

    # ---- building ----
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 1024) -> "Tokenizer":
        """Byte-level BPE on `texts`. Special tokens get ids 0..9 and are never merged into other tokens."""
        _check_vocab_size(vocab_size)
        backend = tokenizers.Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLIT), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        backend.train_from_iterator(_without_specials(texts), trainer)
        # The trainer marks all its tokens special; the reasoning tags must survive skip_special_tokens.
        spec = json.loads(backend.to_str())
        for tok in spec["added_tokens"]:
            tok["special"] = tok["content"] not in TAG_TOKENS
        return cls(backend=tokenizers.Tokenizer.from_str(json.dumps(spec)))

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Load a directory holding an HF tokenizer.json (or the file itself) and its tokenizer_config.json."""
        path = Path(path)
        folder, file = (path.parent, path) if path.is_file() else (path, path / "tokenizer.json")
        if not file.is_file():
            raise UserError(f"no tokenizer.json in {folder}; train one with `nanoseek tokenizer --out {folder}` "
                            f"or point to a Hugging Face model directory")
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises plain Exception on bad JSON / unknown models
            raise UserError(f"{file} is not a valid tokenizer.json ({str(e).splitlines()[0]}); "
                            f"re-save it with tokenizers or transformers") from None
        config: dict = {}
        config_file = folder / "tokenizer_config.json"
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise UserError(f"{config_file} is not valid JSON ({e}); fix or delete it") from None
        template = config.pop("chat_template", None)
        if isinstance(template, list):  # older format: [{"name": "default", "template": ...}, ...]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        jinja_file = folder / "chat_template.jinja"  # where recent transformers save it
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        vocab = backend.get_vocab(with_added_tokens=True)
        names = {}
        for key, guesses in (("bos_token", _GUESS_BOS), ("eos_token", _GUESS_EOS), ("pad_token", _GUESS_PAD)):
            if config_file.is_file():  # the config is authoritative, even when it says null
                names[key] = _token_name(config.pop(key, None))
            else:
                names[key] = next((g for g in guesses if g in vocab), None)
            if names[key] is not None and names[key] not in vocab:
                raise UserError(f"{config_file}: {key} {names[key]!r} is not in the vocabulary of {file}; "
                                f"fix {key} in tokenizer_config.json")
        generation: dict = {}
        generation_file = folder / "generation_config.json"
        if generation_file.is_file():
            try:
                generation = json.loads(generation_file.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise UserError(f"{generation_file} is not valid JSON ({e}); fix or delete it") from None
            if not isinstance(generation, dict):
                raise UserError(f"{generation_file} must hold a JSON object; fix or delete it")
        return cls(backend=backend, chat_template=template or CHAT_TEMPLATE, source=str(folder),
                   extra_config=config, generation_config=generation, **names)

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json + tokenizer_config.json atomically (the directory appears complete or not at all)."""
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                  **self.extra_config, "bos_token": self.bos_token, "eos_token": self.eos_token,
                  "pad_token": self.pad_token, "chat_template": self.chat_template}
        with atomic_dir(path) as tmp:
            self.backend.save(str(tmp / "tokenizer.json"))
            (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
            if self.generation_config:
                (tmp / "generation_config.json").write_text(json.dumps(self.generation_config, indent=2) + "\n",
                                                            encoding="utf-8")

    # ---- encoding ----
    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and each token's (start, end) character span in `text` (SFT finds response tokens with these)."""
        enc = self.backend.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @cached_property
    def vocab_size(self) -> int:
        """Max id + 1 (added tokens included): how many embedding rows a model needs."""
        return max(self.backend.get_vocab(with_added_tokens=True).values()) + 1

    def __len__(self) -> int:
        return self.vocab_size

    def token_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return None if self.bos_token is None else self.token_id(self.bos_token)

    @property
    def eos_id(self) -> int:
        if self.eos_token is None:
            raise UserError(f"tokenizer {self.source} has no eos token; set eos_token in its tokenizer_config.json")
        return self.token_id(self.eos_token)

    @cached_property
    def eos_ids(self) -> list[int]:
        """Every token that ends a completion, eos first: eos, generation_config.json's eos_token_id (an int or
        a list: Qwen2.5-Instruct lists <|im_end|> and <|endoftext|>), and the special token that closes an
        assistant turn in the chat template (<|im_end|> in ChatML, <|eot_id|> in Llama 3), which a chat model
        emits where a base tokenizer's eos would come."""
        ids = [] if self.eos_token is None else [self.eos_id]
        extra = self.generation_config.get("eos_token_id")
        for i in (extra if isinstance(extra, list) else [extra]):
            if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.vocab_size:
                ids.append(i)
        end = self.end_of_turn_id
        if end is not None:
            ids.append(end)
        if not ids:
            raise UserError(f"tokenizer {self.source} has no eos token; set eos_token in its tokenizer_config.json")
        return list(dict.fromkeys(ids))

    @cached_property
    def end_of_turn_id(self) -> int | None:
        """The first special token the chat template writes after an assistant message's content (None when it
        writes none or does not render a user + assistant exchange)."""
        mark = "\x00nanoseek\x00"
        try:
            text = self.apply_chat_template([{"role": "user", "content": "1"}, {"role": "assistant", "content": mark}],
                                            add_generation_prompt=False)
        except UserError:
            return None
        if mark not in text:
            return None
        special = {i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}
        return next((i for i in self.encode(text[text.rindex(mark) + len(mark):]) if i in special), None)

    @property
    def pad_id(self) -> int:
        return self.eos_id if self.pad_token is None else self.token_id(self.pad_token)

    # ---- chat ----
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render `messages` ([{"role": "user"|"assistant"|"system", "content": str}]) to text; encode() it."""
        return render_chat(messages, add_generation_prompt, self.chat_template, source=self.source,
                           bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                           pad_token=self.pad_token or "")


def render_chat(messages: list[dict], add_generation_prompt: bool = True, template: str = CHAT_TEMPLATE,
                source: str = "the default template", **special_tokens: str) -> str:
    """Render a chat template as transformers does. Without a tokenizer it gives our own format (the corpus
    is written before any tokenizer exists)."""
    from jinja2.exceptions import TemplateError

    special_tokens = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, **special_tokens}
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **special_tokens)
    except TemplateError as e:
        raise UserError(f"chat template of {source} failed ({e}); check the messages' roles and contents, or "
                        f"fix chat_template in tokenizer_config.json") from None


@lru_cache(maxsize=8)
def _compile(template: str):
    """Sandboxed, trim_blocks, lstrip_blocks and raise_exception: the environment transformers uses."""
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def _check_vocab_size(vocab_size: int) -> None:
    if vocab_size < MIN_VOCAB:
        raise UserError(f"vocab size {vocab_size} is too small; use at least {MIN_VOCAB} (256 bytes + "
                        f"{len(SPECIAL_TOKENS)} special tokens), e.g. --vocab-size 1024")


def _without_specials(texts: Iterable[str]) -> Iterator[str]:
    """Cut special-token strings out of the training text so BPE spends no merges on "<think>" and kin."""
    pattern = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
    for text in texts:
        yield from (piece for piece in pattern.split(text) if piece)
