"""Hugging Face chat templates (jinja2): find them in a model directory, check that they compile,
and render them the way `transformers.apply_chat_template` does.

Templates come from model files, so they are untrusted code: they run in jinja2's immutable sandbox,
`namespace` refuses underscore attributes, and the template sees only plain JSON-like data.
The environment matches transformers': trim_blocks, lstrip_blocks, loop controls, a
`{% generation %}` block (rendered as its body), `raise_exception`, `strftime_now`, and a `tojson`
filter that does not HTML-escape and keeps non-ASCII text.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ruyiflow.engine.errors import InvalidRequest

# Names a message's reasoning travels under; templates read `reasoning_content` (gpt-oss:
# `thinking`).
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; we only
    need the text, so the block renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that cannot store dunder/private attributes (a sandbox escape route)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # same signature trick as jinja2's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    """Compile once per distinct template text; raises jinja2.TemplateSyntaxError."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    env.globals["dict"] = lambda *args, **kwargs: dict(*args, **kwargs)
    return env.from_string(source)


def check_templates(sources: Iterable[str], where: str | Path) -> None:
    """Compile each template now, so a broken one fails at load time (ValueError naming `where`)."""
    for source in sources:
        try:
            compile_template(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ValueError(
                f"{where}: chat template does not compile (line {exc.lineno}: {exc.message})"
            ) from exc


def read_json(file: Path) -> dict[str, Any]:
    """A JSON object from an optional file ({} when absent); ValueError naming the file if bad."""
    if not file.is_file():
        return {}
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file}: unreadable JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(value).__name__}")
    return value


def find_templates(
    root: Path, tokenizer_config: Mapping[str, Any]
) -> tuple[str | None, dict[str, str], Path]:
    """(default template, named templates, the file they came from) in a Hugging Face directory.

    As in transformers, chat_template.jinja wins over chat_template.json, which wins over
    tokenizer_config.json's `chat_template`: a string, or a list of {"name", "template"} where
    "default" is the default and "tool_use" serves requests with tools. Extra named templates may
    sit in additional_chat_templates/*.jinja. Raises ValueError naming the file.
    """
    named: dict[str, str] = {}
    try:
        extra = root / "additional_chat_templates"
        if extra.is_dir():
            named = {f.stem: f.read_text(encoding="utf-8") for f in sorted(extra.glob("*.jinja"))}
        jinja = root / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8"), named, jinja
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{root}: unreadable chat template file ({exc})") from exc
    json_file = root / "chat_template.json"
    if json_file.is_file():
        where, value = json_file, read_json(json_file).get("chat_template")
    else:
        where, value = root / "tokenizer_config.json", tokenizer_config.get("chat_template")
    if value is None or isinstance(value, str):
        return value or named.get("default"), named, where
    if isinstance(value, list) and all(
        isinstance(t, dict)
        and isinstance(t.get("name"), str)
        and isinstance(t.get("template"), str)
        for t in value
    ):
        named.update({t["name"]: t["template"] for t in value})
        return named.get("default"), named, where
    raise ValueError(f"{where}: chat_template must be a string or a list of {{name, template}}")


def _plain(value: Any) -> Any:
    """A copy made of JSON-like types only, so the sandbox never sees caller objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


def _normalize_message(message: Any) -> dict[str, Any]:
    """Drop None-valued keys (OpenAI clients send `content=None`) and copy reasoning under the
    names templates read, as transformers does."""
    if not isinstance(message, Mapping):
        raise InvalidRequest(f"chat messages must be dicts, got {type(message).__name__}")
    out = {k: v for k, v in _plain(message).items() if v is not None}
    reasoning = next((out[k] for k in REASONING_FIELDS if k in out), None)
    if reasoning is not None:
        out = {"thinking": reasoning, **out, "reasoning_content": reasoning}
    return out


def render_chat(
    source: str,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool,
    tools: list[dict[str, Any]] | None = None,
    documents: list[dict[str, Any]] | None = None,
    variables: Mapping[str, Any] | None = None,
) -> str:
    """Render `source` over the conversation. `variables` (special tokens, template switches such
    as `enable_thinking`) become template globals. A template that rejects the conversation (its
    `raise_exception`, or any runtime error) raises InvalidRequest."""
    if not messages:
        raise InvalidRequest("cannot apply a chat template to an empty conversation")
    chat = [_normalize_message(m) for m in messages]
    try:
        return compile_template(source).render(
            messages=chat,
            tools=_plain(tools),
            documents=_plain(documents),
            add_generation_prompt=add_generation_prompt,
            **_plain(dict(variables or {})),
        )
    except jinja2.exceptions.TemplateError as exc:
        raise InvalidRequest(f"chat template rejected the conversation: {exc}") from exc
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise InvalidRequest(f"chat template failed on the conversation: {exc!r}") from exc
