"""An engine's completion chunks as our tokens: ids, text and per-token confidence.

OpenAI-compatible engines stream text, not token ids. Ids come, best first, from
- vLLM's `return_tokens_as_token_ids` (each logprobs token spelled `token_id:<id>`), exact;
- the local tokenizer's table of single-token texts (a byte-level BPE token's text is unique
  when it is whole UTF-8), exact for such tokens;
- else the local tokenizer's encoding of the piece's text (a token holding part of a
  multi-byte character has no text of its own, so it leaves no id: counts may then differ
  from the engine's by those tokens; the text relayed is what the engine sent).
A node without a local tokenizer (`text_pieces`) has no table and no encoding: one piece per
token the engine's logprobs list (vLLM/SGLang stream one token per chunk anyway), each with
its own text when those add up to the chunk's, the id only when vLLM spelled it
(`return_tokens_as_token_ids`), else `UNKNOWN_TOKEN_ID`; without logprobs one piece per chunk.
Confidence comes from the top-2 logprobs: max_prob = p1, margin = p1 - p2, and the entropy
over the returned alternatives with the rest of the mass as one outcome (a lower bound of the
full distribution's). Without logprobs a chunk's text is encoded locally and its tokens report
max_prob 1 (the node says `confidence: none` and never escalates).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ruyiflow.cluster.openai_types import ChatChunkChoice, CompletionChoice
from ruyiflow.cluster.wire import UNKNOWN_TOKEN_ID
from ruyiflow.engine.events import Confidence
from ruyiflow.engine.tokenizer import Tokenizer

TOKEN_ID_PREFIX = "token_id:"
NO_CONFIDENCE = Confidence(max_prob=1.0, margin=1.0, entropy=0.0)
_BROKEN = "\ufffd"  # what a partial UTF-8 sequence decodes to


@dataclass(frozen=True)
class Piece:
    """One token as the node emits it (`text` may be empty, e.g. all on a chunk's last)."""

    token_id: int
    text: str
    confidence: Confidence


def confidence_of(top: dict[str, float] | None) -> Confidence:
    """Confidence from one position's top logprobs (`{token text: logprob}`)."""
    if not top:
        return NO_CONFIDENCE
    probs = sorted((math.exp(v) for v in top.values() if v is not None), reverse=True)
    if not probs:
        return NO_CONFIDENCE
    p1 = probs[0]
    p2 = probs[1] if len(probs) > 1 else 0.0
    rest = max(0.0, 1.0 - sum(probs))
    entropy = -sum(p * math.log(p) for p in [*probs, rest] if p > 0.0)
    return Confidence(max_prob=p1, margin=p1 - p2, entropy=entropy)


class TokenMapper:
    """Token ids for an engine's token texts, through the local tokenizer."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        texts = tokenizer.backend.decode_batch(
            [[i] for i in range(tokenizer.vocab_size)], skip_special_tokens=False
        )
        self._ids: dict[str, int] = {}
        for token_id, text in enumerate(texts):
            if text and _BROKEN not in text:
                self._ids.setdefault(text, token_id)  # lowest id wins a (rare) tie

    def ids_of(self, piece: str) -> list[int]:
        if piece.startswith(TOKEN_ID_PREFIX):
            return [int(piece[len(TOKEN_ID_PREFIX) :])]
        token_id = self._ids.get(piece)
        if token_id is not None:
            return [token_id]
        return self.tokenizer.encode(piece) if piece else []

    def pieces(self, choice: CompletionChoice) -> list[Piece]:
        """The tokens of one streamed choice; the chunk's text goes on the last of them, so
        the text relayed is exactly the engine's."""
        lp = choice.logprobs
        if lp is None or not lp.tokens:
            ids = self.tokenizer.encode(choice.text) if choice.text else []
            confidences = [NO_CONFIDENCE] * len(ids)
        else:
            ids, confidences = [], []
            tops = lp.top_logprobs or []
            for i, token in enumerate(lp.tokens):
                token_ids = self.ids_of(token)
                ids += token_ids
                confidences += [confidence_of(tops[i] if i < len(tops) else None)] * len(token_ids)
        if not ids and choice.text:  # only pieces without text of their own: the chunk's
            ids = self.tokenizer.encode(choice.text)
            confidences = [NO_CONFIDENCE] * len(ids)
        if not ids:
            return []
        last = len(ids) - 1
        return [
            Piece(token_id, choice.text if i == last else "", confidences[i])
            for i, token_id in enumerate(ids)
        ]


UNKNOWN_PIECE = Piece(UNKNOWN_TOKEN_ID, "", NO_CONFIDENCE)  # a token the engine only counted


def _engine_tokens(choice: CompletionChoice | ChatChunkChoice) -> list[tuple[str, Confidence]]:
    """(token text, confidence) per token the choice's logprobs list, either endpoint's shape."""
    lp = choice.logprobs
    if lp is None:
        return []
    if isinstance(choice, ChatChunkChoice):
        return [
            (t.token, confidence_of({a.token: a.logprob for a in t.top_logprobs} or None))
            for t in lp.content or []
        ]
    tops = lp.top_logprobs or []
    return [(t, confidence_of(tops[i] if i < len(tops) else None)) for i, t in enumerate(lp.tokens)]


def text_pieces(choice: CompletionChoice | ChatChunkChoice) -> list[Piece]:
    """The tokens of one streamed choice on a node without a tokenizer."""
    text = choice.text if isinstance(choice, CompletionChoice) else choice.delta.content or ""
    tokens = _engine_tokens(choice)
    if not tokens:
        return [Piece(UNKNOWN_TOKEN_ID, text, NO_CONFIDENCE)] if text else []
    ids = [
        int(t[len(TOKEN_ID_PREFIX) :]) if t.startswith(TOKEN_ID_PREFIX) else UNKNOWN_TOKEN_ID
        for t, _ in tokens
    ]
    if "".join(t for t, _ in tokens) == text:
        texts = [t for t, _ in tokens]
    else:  # ids spelled as `token_id:N`, or bytes split differently: the chunk's text, once
        texts = [""] * (len(tokens) - 1) + [text]
    return [Piece(i, t, c) for i, t, (_, c) in zip(ids, texts, tokens, strict=True)]
