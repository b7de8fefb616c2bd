"""Request limits both the router and the nodes enforce before doing any work on a request.

Each check is cheap and runs in order of cost: the encoded size of the whole message (every
field counts, a 4 MB `role` as much as a 4 MB prompt), then the roles, then the bytes of text,
and only then does anything tokenize. A tokenizer needs at least one byte per token on these
byte-level vocabularies, so bounding bytes bounds the work of `encode` before it runs.
"""

from __future__ import annotations

from ruyiflow.engine.errors import InvalidRequest
from ruyiflow.proto import ruyiflow_pb2 as pb

MESSAGE_ROLES = ("system", "user", "assistant", "tool")
# The router's limit on a client's whole request: 32 KiB of prompt text, 4096 token ids (up to
# 5 bytes each), stop strings and settings fit with room to spare.
MAX_CLIENT_REQUEST_BYTES = 128 << 10
# A node's limit: the client request plus what the router adds on a failover (the relayed
# tokens as prefix ids, up to max_tokens of them, or their text).
MAX_NODE_REQUEST_BYTES = 2 << 20
MAX_NODE_PROMPT_BYTES = 256 << 10  # UTF-8 bytes of text over all messages, before tokenizing


def check_request_size(request: pb.GenerateRequest, limit: int) -> None:
    """InvalidRequest when the encoded request passes `limit` bytes."""
    num_bytes = request.ByteSize()
    if num_bytes > limit:
        raise InvalidRequest(f"request too large: {num_bytes} bytes, limit {limit}")


def check_roles(request: pb.GenerateRequest) -> None:
    """InvalidRequest for a message whose role is not one of MESSAGE_ROLES."""
    for i, message in enumerate(request.conversation.messages):
        if message.role not in MESSAGE_ROLES:
            shown = message.role[:32] + ("..." if len(message.role) > 32 else "")
            raise InvalidRequest(
                f"conversation.messages[{i}].role {shown!r} is not one of "
                f"{', '.join(MESSAGE_ROLES)}"
            )


def prompt_bytes(request: pb.GenerateRequest) -> int:
    """UTF-8 bytes of the prompt's text (every message's role and content, or the raw text)."""
    if request.WhichOneof("prompt") == "text":
        return len(request.text.encode())
    return sum(
        len(m.role.encode()) + len(m.content.encode()) for m in request.conversation.messages
    )
