"""Byte-level BPE tokenizer, Hugging Face files, and the chat formats.

    tok = Tokenizer.train(texts, vocab_size=1024)      # byte-level BPE, digits split one by one
    tok.save(dir)                                      # tokenizer.json + tokenizer_config.json (with chat_template)
    tok = Tokenizer.load(dir)                          # ANY HF tokenizer.json (+ tokenizer_config.json when present)
    tok.encode(text) -> list[int]                      # never adds bos/eos: callers place them
    tok.encode_batch(texts) -> list[list[int]]
    tok.encode_offsets(text, add_special_tokens=False) -> (ids, [(start, end) character span per token])
    tok.decode(ids, skip_special_tokens=False) -> str
    len(tok) == tok.vocab_size                         # max id + 1: the embedding rows a model needs
    tok.bos_id (may be None for user tokenizers), tok.eos_id, tok.pad_id (falls back to eos)
    tok.eos_ids                                        # every id that ends a completion (generation config, template)
    tok.token_id("<think>") -> int | None              # None when the string is not one token
    tok.apply_chat_template(messages, add_generation_prompt=True, tools=None, **template_kwargs) -> str
    tok.render_chat_spans(messages, add_generation_prompt=False, tools=None) -> (text, [(start, end) of each
                                                       {% generation %} block])   # transformers' assistant mask
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
- The chat template is one Jinja string, rendered exactly as transformers renders it (by transformers' own
  renderer when it is installed, else by a copy of its jinja2 environment), so
  `AutoTokenizer.from_pretrained(dir).apply_chat_template` gives the same text and ids. Our format is compact:
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


def _json_object(path: Path) -> dict:
    """The JSON object in `path` ({} when the file is absent); a UserError naming the file when it is not one."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); fix or delete it") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} must hold a JSON object; fix or delete it")
    return value


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
        config_file = folder / "tokenizer_config.json"
        config = _json_object(config_file)
        template = config.pop("chat_template", None)
        if isinstance(template, list):  # older format: [{"name": "default", "template": ...}, ...]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        jinja_file = folder / "chat_template.jinja"  # where recent transformers save it; it wins, as there
        if jinja_file.is_file():
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
        return cls(backend=backend, chat_template=template or CHAT_TEMPLATE, source=str(folder),
                   extra_config=config, generation_config=_json_object(folder / "generation_config.json"), **names)

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

    def encode_offsets(self, text: str, add_special_tokens: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and each token's (start, end) character span in `text` (SFT finds response tokens with these).
        add_special_tokens: what the tokenizer's post-processor adds (e.g. Llama's bos, span (0, 0)), as
        transformers' `tokenizer(text)` does; plain-text SFT wants it, rendered chat templates do not."""
        enc = self.backend.encode(text, add_special_tokens=add_special_tokens)
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
    @property
    def template_tokens(self) -> dict[str, str]:
        """The special tokens a chat template sees, as transformers passes them (its `special_tokens_map`: the
        named tokens that are set; an unset one stays undefined in the template rather than "")."""
        names = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token}
        names.update({k: _token_name(self.extra_config.get(k)) for k in ("unk_token", "sep_token", "cls_token",
                                                                         "mask_token")})
        return {k: v for k, v in names.items() if v is not None}

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, *,
                            tools: list[dict] | None = None, **template_kwargs) -> str:
        """Render `messages` ([{"role": "user"|"assistant"|"system", "content": str}]) to text; encode() it."""
        return self.render_chat_spans(messages, add_generation_prompt, tools=tools, **template_kwargs)[0]

    def render_chat_spans(self, messages: list[dict], add_generation_prompt: bool = False, *,
                          tools: list[dict] | None = None, **template_kwargs) -> tuple[str, list[tuple[int, int]]]:
        """(text, [(start, end) character span of each `{% generation %}` block]): transformers'
        `return_assistant_tokens_mask` spans; [] for a template without generation blocks."""
        return render_chat_spans(messages, add_generation_prompt, self.chat_template, source=self.source,
                                 tools=tools, special_tokens=self.template_tokens, **template_kwargs)


def render_chat(messages: list[dict], add_generation_prompt: bool = True, template: str = CHAT_TEMPLATE,
                source: str = "the default template", **template_kwargs) -> str:
    """Render a chat template as transformers does. Without a tokenizer it gives our own format (the corpus
    is written before any tokenizer exists)."""
    return render_chat_spans(messages, add_generation_prompt, template, source, **template_kwargs)[0]


def has_generation_blocks(template: str) -> bool:
    """Whether the template marks assistant text with `{% generation %}` (transformers' own test, verbatim)."""
    return re.search(r"\{\%-?\s*generation\s*-?\%\}", template) is not None


def render_chat_spans(messages: list[dict], add_generation_prompt: bool = True, template: str = CHAT_TEMPLATE,
                      source: str = "the default template", *, tools: list[dict] | None = None,
                      special_tokens: dict[str, str] | None = None,
                      **template_kwargs) -> tuple[str, list[tuple[int, int]]]:
    """(rendered text, character spans of the `{% generation %}` blocks), exactly as transformers'
    `apply_chat_template(..., tokenize=False)` renders it: with transformers' own renderer when it is
    importable, else with `_fallback_template`, a copy of its environment. Keys whose value is None are dropped
    from each message first (transformers does, so `"content": None` never renders as "None").
    special_tokens: the tokenizer's ({"bos_token": ..., ...}, the unset ones left out); None = ours (our
    format without a tokenizer). template_kwargs: further variables, which override them (as in transformers)."""
    from jinja2.exceptions import TemplateError

    if special_tokens is None:
        special_tokens = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    template_kwargs = {**special_tokens, **template_kwargs}
    messages = [{k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m for m in messages]
    track = has_generation_blocks(template)
    try:
        render = _transformers_renderer()
        if render is not None:
            texts, spans = render([messages], tools=tools, chat_template=template,
                                  add_generation_prompt=add_generation_prompt, return_assistant_tokens_mask=track,
                                  **template_kwargs)
            return texts[0], [tuple(s) for s in spans[0]] if track else []
        return _render_fallback(_fallback_template(template), messages, tools, add_generation_prompt, template_kwargs)
    except (TemplateError, TypeError, ValueError) as e:
        # TemplateError: the template's own raise_exception or an undefined name; TypeError / ValueError: a
        # message the template cannot handle (e.g. "a" + 1) or that transformers refuses
        raise UserError(f"chat template of {source} failed ({e}); check the messages' roles and contents, or "
                        f"fix chat_template in tokenizer_config.json") from None


@lru_cache(maxsize=1)
def _transformers_renderer():
    """transformers' `render_jinja_template` when transformers is installed (the reference itself), else None."""
    try:
        from transformers.utils.chat_template_utils import render_jinja_template
    except ImportError:
        return None
    return render_jinja_template


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")   # transformers reads a reasoning under these


def _render_fallback(compiled, messages: list[dict], tools, add_generation_prompt: bool,
                     template_kwargs: dict) -> tuple[str, list[tuple[int, int]]]:
    """Render as transformers' render_jinja_template does for one conversation: a message's reasoning is
    copied under every name templates read it by, and the text is built from the template's stream of
    blocks so each `{% generation %}` block knows its character offset."""
    aliased = []
    for m in messages:
        reasoning = next((m[k] for k in _REASONING_FIELDS if isinstance(m, dict) and m.get(k) is not None), None)
        aliased.append(m if reasoning is None else {"thinking": reasoning, **m, "reasoning_content": reasoning})
    blocks: list[str] = []
    spans: list[tuple[int, int]] = []
    token = compiled.environment.tracking.set((blocks, spans))   # a context variable: thread-safe
    try:
        for block in compiled.generate(messages=aliased, tools=tools, documents=None,
                                       add_generation_prompt=add_generation_prompt, **template_kwargs):
            blocks.append(block)
    finally:
        compiled.environment.tracking.reset(token)
    return "".join(blocks), spans


@lru_cache(maxsize=8)
def _fallback_template(template: str):
    """transformers' chat-template environment, rebuilt for when transformers is not installed: sandboxed,
    trim_blocks + lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, a `tojson` that keeps key
    order and does not HTML-escape (ensure_ascii=False, indent / separators / sort_keys options), a
    `namespace` that refuses underscore attributes, and the `{% generation %}` tag, which renders its body
    and records the body's character span."""
    from contextvars import ContextVar
    from datetime import datetime

    import jinja2
    from jinja2.exceptions import SecurityError, TemplateError
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_span"), [], [], body).set_lineno(lineno)

        def _span(self, caller):
            text = caller()
            if (tracking := self.environment.tracking.get()) is not None:   # where this block starts:
                blocks, spans = tracking                                        # after the blocks so far
                start = sum(map(len, blocks))
                spans.append((start, start + len(text)))
            return text

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class Namespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):             # jinja's signature trick: `namespace(self=...)` still works
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise SecurityError(f"chat templates cannot store underscore attributes on a namespace ({name!r})")

    class TemplateDict:                            # `dict(...)` and `dict.fromkeys(...)`, not the type itself
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.tracking = ContextVar("generation_spans", default=None)
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, namespace=Namespace,
                       dict=TemplateDict())
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
