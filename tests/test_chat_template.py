"""Chat templates render exactly as transformers' `apply_chat_template` renders them: real templates (ChatML /
Qwen2.5 with its default system prompt and tools branch, Llama 3.2 with `strftime_now` and `tojson(indent=4)`,
DeepSeek-V3 and R1 with their full-width markers and think handling, and ours), through transformers'
renderer and through the fallback used without transformers; the same text and the same token ids."""

import json
from datetime import datetime

import pytest

import nanoseek.tokenizer as tokenizer_module
from nanoseek.errors import UserError
from nanoseek.tokenizer import CHAT_TEMPLATE, Tokenizer

transformers = pytest.importorskip("transformers")

# Qwen2.5-Instruct's template (ChatML): a default system prompt, tools as JSON lines, tool calls and responses.
QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Llama 3.2-Instruct's template: today's date from strftime_now, tools in the first user message (tojson indent 4).
LLAMA32 = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# DeepSeek-R1's template: system prompts joined up front, full-width markers, the reasoning before </think>
# dropped from assistant turns, and a generation prompt that opens <think>.
DEEPSEEK_R1 = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='', is_first_sp=true) %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}{%- if ns.is_first_sp %}"
    "{% set ns.system_prompt = ns.system_prompt + message['content'] %}{% set ns.is_first_sp = false %}"
    "{%- else %}{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}{%- endif %}"
    "{%- endif %}{%- endfor %}{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and 'tool_calls' in message %}{%- set ns.is_tool = false -%}"
    "{%- for tool in message['tool_calls'] %}{%- if not ns.is_first %}{%- if message['content'] is none %}"
    "{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{%- else %}"
    "{{'<｜Assistant｜>' + message['content'] + '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{%- endif %}{%- set ns.is_first = true -%}{%- else %}"
    "{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{%- endif %}{%- endfor %}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and 'tool_calls' not in message %}{%- if ns.is_tool %}"
    "{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}"
    "{%- else %}{% set content = message['content'] %}{% if '</think>' in content %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- set ns.is_output_first = false %}{%- else %}"
    "{{'<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}"
    "{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}"
)
# DeepSeek-V3's: the same markers, assistant turns kept whole, a bare <｜Assistant｜> generation prompt.
DEEPSEEK_V3 = (DEEPSEEK_R1
               .replace("{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}", "")
               .replace("{{'<｜Assistant｜><think>\\n'}}", "{{'<｜Assistant｜>'}}"))

TEMPLATES = {   # name -> (template, bos, eos, pad)
    "qwen2.5": (QWEN25, None, "<|im_end|>", "<|endoftext|>"),
    "llama3.2": (LLAMA32, "<|begin_of_text|>", "<|eot_id|>", None),
    "deepseek-r1": (DEEPSEEK_R1, "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "deepseek-v3": (DEEPSEEK_V3, "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "nanoseek": (CHAT_TEMPLATE, "<|bos|>", "<|eos|>", "<|pad|>"),
}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>",
            "<｜Assistant｜>", "<think>", "</think>", "<|bos|>", "<|eos|>", "<|pad|>", "<|user|>", "<|assistant|>",
            "<|system|>"]

WEATHER = {"type": "function", "function": {   # keys out of sorted order; "<", "&" and non-ASCII: tojson must keep them
    "name": "get_weather", "description": "Weather <now> & in °C for a city, e.g. Zürich",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "名字"}},
                   "required": ["city"]}}}
CHATS = [
    [{"role": "user", "content": "What is 12 + 30? café ✓ 東京 🙂"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 7 and 8."},
     {"role": "assistant", "content": "<think>7 + 8 = 15</think>15"}, {"role": "user", "content": "And 15 × 2?"}],
    [{"role": "user", "content": "Add 7 and 8."}, {"role": "assistant", "content": "<think>\nseven plus eight\n</think>\n\n15"},
     {"role": "user", "content": "Merci, et 15 − 2 ?"}, {"role": "assistant", "content": "13 ✓"}],
]
TOOL_CHAT = [{"role": "user", "content": "Weather in Zürich?"},
             {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {
                 "name": "get_weather", "arguments": {"city": "Zürich", "unit": "°C"}}}]},
             {"role": "tool", "content": "12 °C"}, {"role": "assistant", "content": "12 °C in Zürich."}]


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    """One byte-level BPE with every template's special tokens, saved as tokenizer.json."""
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    texts = [json.dumps(c, ensure_ascii=False) for c in CHATS + [TOOL_CHAT, [WEATHER]]] * 20
    backend.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    backend.save(str(path))
    return path


def saved_tokenizer(root, tokenizer_json, name, spec=None):
    """A tokenizer directory for template `name` (spec: its (template, bos, eos, pad), default TEMPLATES[name]):
    (ours loaded, transformers' loaded)."""
    template, bos, eos, pad = spec or TEMPLATES[name]
    folder = root / name
    folder.mkdir(exist_ok=True)
    (folder / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, "pad_token": pad,
        "chat_template": template}))
    return Tokenizer.load(folder), transformers.AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(params=["transformers", "fallback"])
def renderer(request, monkeypatch):
    """Both rendering paths: transformers' own renderer, and the copy used when transformers is missing."""
    if request.param == "fallback":
        monkeypatch.setattr(tokenizer_module, "_transformers_renderer", lambda: None)
    return request.param


def _hf_ids(hf, messages, **kw):
    out = hf.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)
    return list(out["input_ids"])


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_render_equals_transformers(name, renderer, tokenizer_json, tmp_path):
    ours, hf = saved_tokenizer(tmp_path, tokenizer_json, name)
    cases = [(chat, gen, None) for chat in CHATS for gen in (True, False)]
    if name in ("qwen2.5", "llama3.2"):             # the tools branches: tojson, its key order and escaping
        cases += [(CHATS[0], True, [WEATHER]), (TOOL_CHAT, False, [WEATHER])]
    for messages, gen, tools in cases:
        text = ours.apply_chat_template(messages, add_generation_prompt=gen, tools=tools)
        assert text == hf.apply_chat_template(messages, add_generation_prompt=gen, tools=tools, tokenize=False)
        assert ours.encode(text) == _hf_ids(hf, messages, add_generation_prompt=gen, tools=tools)
    if name == "llama3.2":
        assert f"Today Date: {datetime.now().strftime('%d %b %Y')}" in ours.apply_chat_template(CHATS[0])
        assert '"description": "Weather <now> & in °C for a city, e.g. Zürich"' in ours.apply_chat_template(
            CHATS[0], tools=[WEATHER])
    if name == "deepseek-r1":                       # earlier reasoning dropped, the generation prompt opens <think>
        text = ours.apply_chat_template(CHATS[2])
        assert "seven" not in text and text.endswith("<｜Assistant｜><think>\n")


def test_unset_special_tokens_stay_undefined(renderer, tokenizer_json, tmp_path):
    """A tokenizer without bos: the template sees no bos_token at all (transformers passes only the set ones)."""
    template = "{% if bos_token is defined %}[bos {{ bos_token }}]{% endif %}{{ messages[0]['content'] + eos_token }}"
    ours, hf = saved_tokenizer(tmp_path, tokenizer_json, "no-bos", (template, None, "<|im_end|>", None))
    assert ours.apply_chat_template(CHATS[0]) == hf.apply_chat_template(CHATS[0], tokenize=False) == \
        CHATS[0][0]["content"] + "<|im_end|>"


def test_template_errors_are_user_errors(renderer, tokenizer_json, tmp_path):
    ours, _ = saved_tokenizer(tmp_path, tokenizer_json, "llama3.2")
    with pytest.raises(UserError, match="only supports single tool-calls"):
        ours.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
            {"function": {"name": "a", "arguments": {}}}, {"function": {"name": "b", "arguments": {}}}]}])
    with pytest.raises(UserError, match="chat template of"):
        tokenizer_module.render_chat([{"role": "user", "content": "x"}], template="{{ messages[0].content + 1 }}")
    with pytest.raises(UserError, match="_x"):   # the sandbox's namespace keeps away from CPython internals
        tokenizer_module.render_chat([], template="{% set ns = namespace(_x=1) %}{{ ns._x }}")


GENERATION_TEMPLATE = (   # ChatML with the assistant turns marked for transformers' return_assistant_tokens_mask
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_generation_spans_equal_transformers_assistant_mask(renderer, tokenizer_json, tmp_path):
    ours, hf = saved_tokenizer(tmp_path, tokenizer_json, "generation",
                               (GENERATION_TEMPLATE, None, "<|im_end|>", "<|endoftext|>"))
    for messages in CHATS[1:]:
        text, spans = ours.render_chat_spans(messages)
        assert [text[a:b] for a, b in spans] == [m["content"] + "<|im_end|>" for m in messages
                                                 if m["role"] == "assistant"]
        out = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, offsets = ours.encode_offsets(text)
        assert ids == list(out["input_ids"])
        mask = [any(s < b and e > a for a, b in spans) for s, e in offsets]
        assert mask == [bool(m) for m in out["assistant_masks"]]


def test_chat_template_jinja_file_wins_as_in_transformers(tokenizer_json, tmp_path):
    """transformers reads chat_template.jinja before tokenizer_config.json's chat_template; so do we."""
    ours, _ = saved_tokenizer(tmp_path, tokenizer_json, "nanoseek")
    (tmp_path / "nanoseek" / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!", encoding="utf-8")
    ours = Tokenizer.load(tmp_path / "nanoseek")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "nanoseek"))
    assert ours.apply_chat_template(CHATS[0]) == hf.apply_chat_template(CHATS[0], tokenize=False) == \
        CHATS[0][0]["content"] + "!"


def test_reasoning_fields_and_none_values_as_in_transformers(renderer, tokenizer_json, tmp_path):
    """A message's reasoning reaches the template under every name templates read (Qwen3 reads
    reasoning_content, gpt-oss thinking), and keys set to None are dropped rather than rendered "None"."""
    template = ("{% for m in messages %}{{ m.role }}:{% if m.reasoning_content is defined %}"
                "<think>{{ m.reasoning_content }}|{{ m.thinking }}</think>{% endif %}{{ m.content }}"
                "{% if m.name is defined %}({{ m.name }}){% endif %}\n{% endfor %}")
    ours, hf = saved_tokenizer(tmp_path, tokenizer_json, "reasoning", (template, None, "<|im_end|>", None))
    messages = [{"role": "user", "content": "2 + 2?", "name": None},
                {"role": "assistant", "content": "4", "reasoning": "two and two"}]
    text = ours.apply_chat_template(messages, add_generation_prompt=False)
    assert text == hf.apply_chat_template(messages, tokenize=False) == \
        "user:2 + 2?assistant:<think>two and two|two and two</think>4"   # trim_blocks eats the "\n" after a tag


@pytest.fixture(scope="module")
def fuzz_tokenizers(tokenizer_json, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    return {name: saved_tokenizer(root, tokenizer_json, name) for name in ("qwen2.5", "llama3.2", "deepseek-r1")}


def test_fallback_matches_transformers_on_random_chats(fuzz_tokenizers):
    """The fallback renderer (what runs without transformers) against transformers on random conversations:
    any Unicode, whitespace at the ends (Llama trims), "</think>" inside contents (R1 splits on it)."""
    from hypothesis import given, settings, strategies as st

    text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20) | st.sampled_from(
        ["  padded\n", "a</think>b", "<think>x</think>\n\ny", "{{ not jinja }}", "東京 🙂"])
    turn = st.tuples(st.sampled_from(["user", "assistant", "system"]), text)

    @settings(max_examples=60, deadline=None, derandomize=True)
    @given(st.lists(turn, min_size=1, max_size=5), st.booleans())
    def check(turns, gen):
        messages = [{"role": r, "content": c} for r, c in turns]
        for ours, hf in fuzz_tokenizers.values():
            expected = hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
            fallback = tokenizer_module._render_fallback(
                tokenizer_module._fallback_template(ours.chat_template), messages, None, gen, ours.template_tokens)
            assert fallback[0] == expected

    check()
