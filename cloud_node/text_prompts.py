"""What a `backend: openai` node without a local tokenizer gives the servicer in its place.

The servicer (`node.servicer`) works on token ids: it encodes a text prompt, renders a
conversation with the chat template and encodes that, and encodes a move's `prefix_text`. A
node without a tokenizer (a model shipping only a tiktoken vocabulary, e.g. Hunyuan-A13B) has
neither ids nor a template, so `TextPrompts` carries the text itself through those ids: each
character becomes `TEXT_ID_BASE + code point`, far above any vocabulary, so the backend tells
text from real token ids (a token-id prompt, `prefix_token_ids`) and refuses the latter by
name. A conversation is not rendered here: it travels as a JSON envelope behind a per-process
marker, and the backend sends its messages to the engine's `/v1/chat/completions`, where the
engine applies its own template.

Counts the servicer takes from these ids are characters, not tokens: its context check is
then conservative, and the prompt count on the first chunk is a character count (the engine's
`usage` has the real one).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ruyiflow.cluster.errors import InvalidRequest

TEXT_ID_BASE = 1 << 31  # above every vocabulary; still a uint32 on the wire
MAX_CODE_POINT = 0x10FFFF


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation the engine renders with its own chat template."""

    messages: list[dict[str, Any]]
    enable_thinking: bool | None


class TextPrompts:
    """The servicer's `tokenizer` on a node without one: text in, text out, no template."""

    vocab_size = TEXT_ID_BASE + MAX_CODE_POINT + 1

    def __init__(self) -> None:
        # A client's text that happens to start like an envelope must stay text.
        self._marker = f"\x00ruyiflow-chat-{secrets.token_hex(8)}\x00"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [TEXT_ID_BASE + ord(c) for c in text]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        if not is_text(ids):
            raise InvalidRequest(
                "this node has no tokenizer: it cannot read token ids (send text or a conversation)"
            )
        return "".join(chr(i - TEXT_ID_BASE) for i in ids)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        **kwargs: Any,
    ) -> str:
        envelope = {"messages": messages, "enable_thinking": enable_thinking}
        return self._marker + json.dumps(envelope, ensure_ascii=False)

    def chat_of(self, text: str) -> ChatPrompt | None:
        """The conversation `text` carries, or None for a plain prompt."""
        if not text.startswith(self._marker):
            return None
        envelope = json.loads(text[len(self._marker) :])
        return ChatPrompt(envelope["messages"], envelope["enable_thinking"])


def is_text(ids: Sequence[int]) -> bool:
    """All of `ids` are characters from `TextPrompts.encode` (none is a real token id)."""
    return all(TEXT_ID_BASE <= i <= TEXT_ID_BASE + MAX_CODE_POINT for i in ids)


def check_text_only(
    node: str, prompt_ids: Sequence[int], prefix_ids: Sequence[int], stop_token_ids: Sequence[int]
) -> None:
    """Refuse, by name, a request to a node without a tokenizer that needs token ids."""
    name = f"node {node} has no tokenizer"
    if not is_text(prompt_ids):
        raise InvalidRequest(f"{name}: token-id prompts need one (send text or messages)")
    if not is_text(prefix_ids):
        raise InvalidRequest(f"{name}: prefix_token_ids need one (send prefix_text)")
    if stop_token_ids:
        raise InvalidRequest(f"{name}: stop_token_ids need one (use stop strings)")
