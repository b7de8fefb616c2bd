"""Handoff state on the wire: `ResumeRequest` parts (header, StateBytes*, StateEnd) built from
and checked into the engine's state bytes. The payload is the engine's self-describing
safetensors layout; the header repeats what routing needs (mode, fingerprint, exits, tokens)."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Iterator

from ruyiflow.cluster.wire import HANDOFF_MODE
from ruyiflow.engine.errors import HandoffError
from ruyiflow.engine.handoff import peek_metadata
from ruyiflow.proto import ruyiflow_pb2 as pb

STATE_MODES = (pb.HANDOFF_MODE_HIDDEN, pb.HANDOFF_MODE_TOKENS)  # what a state on the wire is
CHUNK_BYTES = 1 << 20


def header_for(
    data: bytes,
    request_id: str,
    to_exit: int,
    transfer_id: str = "",
    request: pb.GenerateRequest | None = None,
) -> pb.HandoffHeader:
    meta = peek_metadata(data)
    tokens = [int(t) for t in meta.get("token_ids", [])]
    num_prompt = int(meta.get("num_prompt_tokens", 0))
    return pb.HandoffHeader(
        request_id=request_id,
        mode=HANDOFF_MODE.value(meta["mode"]),
        model_fingerprint=meta["fingerprint"],
        from_exit=int(meta["exit"]),
        to_exit=to_exit,
        prompt_token_ids=tokens[:num_prompt],
        generated_token_ids=tokens[num_prompt:],
        total_bytes=len(data),
        transfer_id=transfer_id,
        request=request or pb.GenerateRequest(),
    )


def state_parts(
    header: pb.HandoffHeader, data: bytes, chunk_bytes: int = CHUNK_BYTES, include_data: bool = True
) -> Iterator[pb.ResumeRequest]:
    yield pb.ResumeRequest(header=header)
    if include_data:
        for offset in range(0, len(data), chunk_bytes):
            yield pb.ResumeRequest(
                data=pb.StateBytes(offset=offset, data=data[offset : offset + chunk_bytes])
            )
        yield pb.ResumeRequest(end=pb.StateEnd(total_bytes=len(data), crc32=zlib.crc32(data)))
    else:
        yield pb.ResumeRequest(end=pb.StateEnd(total_bytes=0))


def read_state(
    parts: Iterable[pb.ResumeRequest],
    max_bytes: int,
    pushed: bool = False,
    on_header: Callable[[pb.HandoffHeader], None] | None = None,
) -> tuple[pb.HandoffHeader, bytes]:
    """Assemble and check a state stream. On Resume a header naming a transfer id carries no
    bytes (they were pushed before); `pushed=True` reads such a push (AcceptState).
    `on_header` sees the checked header before any state byte is read (to reserve room)."""
    it = iter(parts)
    first = next(it, None)
    if first is None or first.WhichOneof("part") != "header":
        raise HandoffError("state stream must start with a header")
    header = first.header
    if header.mode not in STATE_MODES:
        raise HandoffError("state header: mode must be HIDDEN or TOKENS")
    if header.total_bytes > max_bytes:
        raise HandoffError(f"state of {header.total_bytes} bytes exceeds the limit {max_bytes}")
    if on_header is not None:
        on_header(header)
    by_reference = bool(header.transfer_id) and not pushed
    buf = bytearray()
    for part in it:
        kind = part.WhichOneof("part")
        if kind == "data":
            if by_reference:
                raise HandoffError("state bytes sent with a transfer id")
            if part.data.offset != len(buf):
                raise HandoffError(f"state chunk at offset {part.data.offset}, expected {len(buf)}")
            if len(buf) + len(part.data.data) > header.total_bytes:
                raise HandoffError(f"state chunks exceed the announced {header.total_bytes} bytes")
            buf += part.data.data
        elif kind == "end":
            if by_reference:
                return header, b""
            if part.end.total_bytes != len(buf) or len(buf) != header.total_bytes:
                raise HandoffError(f"state truncated: {len(buf)} of {header.total_bytes} bytes")
            if zlib.crc32(buf) != part.end.crc32:
                raise HandoffError("state checksum mismatch")
            return header, bytes(buf)
        else:
            raise HandoffError(f"unexpected {kind!r} part in a state stream")
    raise HandoffError("state stream ended without an end part")
