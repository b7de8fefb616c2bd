"""Text ⇄ token ids, chat templates, stop ids and streaming detokenization.

A `Tokenizer` wraps a `tokenizers.Tokenizer` built from one of two sources:
- a Hugging Face directory: tokenizer.json, plus tokenizer_config.json / chat_template.jinja
  (chat template, special tokens), generation_config.json and config.json (end-of-sequence ids);
- GGUF metadata: a byte-level BPE rebuilt from tokenizer.ggml.{tokens,token_type,merges}, split
  the way llama.cpp splits text for `tokenizer.ggml.pre` (the merges were learned on those splits).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from ruyiflow.engine.chat_template import check_templates, find_templates, read_json, render_chat
from ruyiflow.engine.errors import InvalidRequest, ModelLoadError
from ruyiflow.engine.loaders.gguf_file import GGUFFile


class TokenizerError(ModelLoadError):
    """A tokenizer file is missing, corrupt or unsupported (a ValueError)."""


_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # every digit alone

# `tokenizer.ggml.pre` → split style. "gpt2": ByteLevel's GPT-2 regex (` ?\p{N}+` keeps digit runs
# whole); "digits": each \p{N} isolated first, then the GPT-2 regex (SmolLM, StarCoder); "qwen2",
# "llama3": one regex split, then bytes mapped only. Names as llama.cpp's converter writes them.
PRE_TOKENIZER_STYLES = {
    **dict.fromkeys(("default", "gpt-2", "gpt2", "mpt", "olmo"), "gpt2"),
    **dict.fromkeys(("smollm", "starcoder", "refact", "codeshell"), "digits"),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"), "qwen2"),
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "falcon3", "smaug-bpe", "dbrx"), "llama3"),
}

# Tokens that end a turn or a document. They stop generation when they are special tokens of the
# vocabulary and the chat template writes them (document ends stop regardless).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>")
END_OF_TEXT_TOKENS = ("<|endoftext|>", "<|end_of_text|>")
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte → character map: printable Latin-1 bytes stand for themselves, the other 68
    bytes take the characters from U+0100 up, in byte order."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    rest = [b for b in range(256) if b not in set(keep)]
    return {**{b: chr(b) for b in keep}, **{b: chr(0x100 + i) for i, b in enumerate(rest)}}


def _pre_tokenizer(style: str) -> tuple[Any, bool]:
    """(pre-tokenizer, ignore_merges). Llama 3 takes a split whole when the vocabulary has it,
    before any merge (llama.cpp does the same for that pre type)."""
    gpt2_regex = style in ("gpt2", "digits")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=gpt2_regex)
    if style == "gpt2":
        return byte_level, False
    if style == "digits":
        digits = pre_tokenizers.Digits(individual_digits=True)
        return pre_tokenizers.Sequence([digits, byte_level]), False
    regex = Regex(_QWEN2_SPLIT if style == "qwen2" else _LLAMA3_SPLIT)
    split = pre_tokenizers.Split(regex, "isolated")
    return pre_tokenizers.Sequence([split, byte_level]), style == "llama3"


def _stop_ids(
    backend: tokenizers.Tokenizer, eos_ids: Iterable[int | None], templates: Iterable[str]
) -> tuple[int, ...]:
    ids = [i for i in dict.fromkeys(eos_ids) if i is not None]
    special = {t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.special}
    text = "\n".join(templates)
    for token in END_OF_TURN_TOKENS + END_OF_TEXT_TOKENS:
        token_id = special.get(token)
        if token_id is not None and token_id not in ids:
            if token in text or token in END_OF_TEXT_TOKENS:
                ids.append(token_id)
    return tuple(ids)


def _int_list(value: Any, file: Path) -> list[int]:
    values = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise TokenizerError(f"{file}: eos_token_id must be an int or a list of ints: {value!r}")
    return values


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    value = value.get("content") if isinstance(value, dict) else value
    return value if isinstance(value, str) else None


class Tokenizer:
    """Token ids ⇄ text for one model. `eos_token_ids` are all the ids that end generation."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None = None,
        eos_token_ids: Sequence[int] = (),
        chat_template: str | None = None,
        named_templates: Mapping[str, str] | None = None,
        special_tokens: Mapping[str, str] | None = None,
    ):
        self.backend = backend
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = bos_token_id
        self.eos_token_ids: tuple[int, ...] = tuple(eos_token_ids)
        self.chat_template = chat_template
        self.named_templates = dict(named_templates or {})
        self.special_tokens = dict(special_tokens or {})  # bos_token, eos_token, ... for templates

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load a Hugging Face tokenizer directory (tokenizer.json required)."""
        root = Path(path)
        file = root / "tokenizer.json"
        if not file.is_file():
            raise TokenizerError(f"{file}: not found (a model directory needs tokenizer.json)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON or schema
            raise TokenizerError(f"{file}: not a valid tokenizer.json ({exc})") from exc
        try:
            config = read_json(root / "tokenizer_config.json")
            template, named, where = find_templates(root, config)
            check_templates([*named.values(), *([template] if template else [])], where)
            generation = read_json(root / "generation_config.json")
            has_eos = generation.get("eos_token_id") is not None
            model = {} if has_eos else read_json(root / "config.json")
        except ValueError as exc:
            raise TokenizerError(str(exc)) from exc
        declared = config.get("added_tokens_decoder")
        for entry in declared.values() if isinstance(declared, dict) else ():
            # Tokens declared in tokenizer_config.json only (transformers adds them too).
            content = _token_text(entry) if isinstance(entry, dict) else None
            if content is not None and backend.token_to_id(content) is None:
                special = bool(entry.get("special"))
                token = AddedToken(content, special=special, normalized=False)
                (backend.add_special_tokens if special else backend.add_tokens)([token])
        special = {k: t for k in _SPECIAL_NAMES if (t := _token_text(config.get(k))) is not None}
        eos = [backend.token_to_id(special["eos_token"])] if "eos_token" in special else []
        eos += _int_list(generation.get("eos_token_id"), root / "generation_config.json")
        eos += _int_list(model.get("eos_token_id"), root / "config.json")
        bos = backend.token_to_id(special["bos_token"]) if "bos_token" in special else None
        return cls(
            backend,
            bos_token_id=bos,
            eos_token_ids=_stop_ids(backend, eos, [template or "", *named.values()]),
            chat_template=template,
            named_templates=named,
            special_tokens=special,
        )

    @classmethod
    def from_gguf(cls, source: GGUFFile | str | Path) -> Tokenizer:
        """Build from a GGUF file's metadata (byte-level BPE vocabularies only)."""
        reader = source if isinstance(source, GGUFFile) else GGUFFile(source)
        where = str(reader.path)
        try:
            return cls._from_gguf(reader.metadata, where)
        except TokenizerError:
            raise
        except Exception as exc:  # corrupt metadata: ValueError, IndexError, TypeError, ...
            raise TokenizerError(f"{where}: cannot build a tokenizer from it ({exc})") from exc

    @classmethod
    def _from_gguf(cls, metadata: dict[str, Any], where: str) -> Tokenizer:
        def get(key: str, default: Any = None) -> Any:
            return metadata.get(f"tokenizer.{key}", default)

        if (kind := get("ggml.model")) != "gpt2":
            raise TokenizerError(f"{where}: tokenizer.ggml.model {kind!r} unsupported (only gpt2)")
        tokens, merges = get("ggml.tokens"), get("ggml.merges")
        if not tokens or merges is None:
            raise TokenizerError(f"{where}: no tokenizer.ggml.tokens or tokenizer.ggml.merges")
        types = get("ggml.token_type") or [1] * len(tokens)
        if len(types) != len(tokens):
            raise TokenizerError(f"{where}: {len(types)} token types for {len(tokens)} tokens")
        pre = get("ggml.pre", "default")
        if pre not in PRE_TOKENIZER_STYLES:
            known = ", ".join(sorted(PRE_TOKENIZER_STYLES))
            raise TokenizerError(f"{where}: pre-tokenizer {pre!r} unsupported (known: {known})")
        alphabet = byte_alphabet()
        letters = set(alphabet.values())
        # Tokens are stored in the byte alphabet; some converters write user tokens as raw text.
        spelled = [
            t if set(t) <= letters else "".join(map(alphabet.get, t.encode())) for t in tokens
        ]
        pairs = [tuple(m.split(" ")) for m in merges]
        if bad := next((m for m, p in zip(merges, pairs, strict=True) if len(p) != 2), None):
            raise TokenizerError(f"{where}: malformed merge {bad!r}")
        pre_tokenizer, ignore_merges = _pre_tokenizer(PRE_TOKENIZER_STYLES[pre])
        vocab = {t: i for i, t in enumerate(spelled)}
        backend = tokenizers.Tokenizer(models.BPE(vocab, pairs, ignore_merges=ignore_merges))
        backend.pre_tokenizer = pre_tokenizer
        backend.decoder = decoders.ByteLevel()
        # A control token spelled outside the byte alphabet is a converter mislabel; adding it
        # would grow the vocabulary past the embedding, so it is left out (as transformers does).
        kept = [(t, k) for t, s, k in zip(tokens, spelled, types, strict=True) if t == s]
        backend.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t, k in kept if k == _CONTROL]
        )
        backend.add_tokens(
            [AddedToken(t, special=False, normalized=False) for t, k in kept if k == _USER_DEFINED]
        )
        keys = ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id")
        ids = {name: get(f"ggml.{key}") for name, key in zip(_SPECIAL_NAMES, keys, strict=True)}
        special = {k: tokens[i] for k, i in ids.items() if i is not None and 0 <= i < len(tokens)}
        head, tail = (
            [(special[k], ids[k])] if get(f"ggml.add_{k}", False) and k in special else []
            for k in ("bos_token", "eos_token")
        )
        backend.post_processor = _edge_processor(head, tail)
        template = get("chat_template") or None
        prefix = "tokenizer.chat_template."
        named = {k[len(prefix) :]: v for k, v in metadata.items() if k.startswith(prefix)}
        try:
            check_templates([*named.values(), *([template] if template else [])], where)
        except ValueError as exc:
            raise TokenizerError(str(exc)) from exc
        stops = [ids["eos_token"], get("ggml.eot_token_id"), get("ggml.eom_token_id")]
        return cls(
            backend,
            bos_token_id=ids["bos_token"],
            eos_token_ids=_stop_ids(backend, stops, [template or "", *named.values()]),
            chat_template=template,
            named_templates=named,
            special_tokens=special,
        )

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Special-token texts inside `text` (as a rendered chat template has) become their ids;
        `add_special_tokens` adds what the tokenizer puts around a sequence (e.g. BOS)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def stream(
        self, prefix_ids: Sequence[int] = (), skip_special_tokens: bool = False
    ) -> StreamDecoder:
        """A decoder for one generation. `prefix_ids`: tokens whose text was already delivered
        (a resumed request); a character they leave unfinished comes out with the next push."""
        return StreamDecoder(self, prefix_ids, skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt text for `messages`, as transformers renders it. `enable_thinking` reaches the
        template only when given, so a template can tell "off" from "unset"."""
        source = (self.named_templates.get("tool_use") if tools else None) or self.chat_template
        if source is None:
            names = sorted(self.named_templates)
            hint = f" (named templates {names}, none is 'default')" if names else ""
            raise InvalidRequest(f"this model has no chat template{hint}; send a raw prompt")
        variables = {**self.special_tokens, **kwargs}
        if enable_thinking is not None:
            variables["enable_thinking"] = enable_thinking
        documents = variables.pop("documents", None)
        return render_chat(
            source,
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            documents=documents,
            variables=variables,
        )


def _edge_processor(head: list[tuple[str, int]], tail: list[tuple[str, int]]) -> Any:
    """Post-processor adding BOS/EOS around a sequence when the GGUF asks for them (else none)."""
    if not head and not tail:
        return None
    single = [f"{t}:0" for t, _ in head] + ["$A:0"] + [f"{t}:0" for t, _ in tail]
    pair = single + [f"{t}:1" for t, _ in head] + ["$B:1"] + [f"{t}:1" for t, _ in tail]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=head + tail)


class StreamDecoder:
    """Turns generated tokens into text deltas.

    Byte-level BPE spreads one character over several tokens, so text is released only when the
    decoded window does not end in U+FFFD (an unfinished UTF-8 sequence). Each decode covers
    ids[prefix:], where `prefix` is the release point before last: the text already released and
    the new text are decoded with the same left context (SentencePiece decoders drop the space of a
    window's first token). Invariant: concatenated deltas + flush() == decode(all ids).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prefix_ids: Sequence[int] = (),
        skip_special_tokens: bool = False,
    ):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids = list(prefix_ids)
        read = len(self._ids)
        # Back off over the ≤ 3 tokens that may hold a character the prefix left unfinished.
        while (
            read > 0 and len(self._ids) - read < 3 and self._text(read - 8, read).endswith("\ufffd")
        ):
            read -= 1
        self._prefix, self._read = max(0, read - 4), read
        self._released = self._text(self._prefix, self._read)

    def _text(self, start: int, end: int | None = None) -> str:
        ids = self._ids[max(0, start) : end]
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Append one generated token; returns the text it completes ('' mid-character)."""
        self._ids.append(token_id)
        return self._release(final=False)

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character decodes as U+FFFD)."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        text = self._text(self._prefix)
        if len(text) <= len(self._released) or (text.endswith("\ufffd") and not final):
            return ""
        delta = text[len(self._released) :]
        self._prefix, self._read = self._read, len(self._ids)
        self._released = self._text(self._prefix, self._read)
        return delta
