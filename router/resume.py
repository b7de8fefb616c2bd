"""Resume tokens: how a client survives the death of its router. Every chunk a router sends
carries `resume_token` = HMAC-SHA256(key, digest of the request || digest of every token id
sent so far || digest of their text). A client whose router dies sends the same request to
another router of the cluster with `resume` = (the ids and text it received, the last token);
that router checks the signature - so a client cannot make a node continue from tokens no
router produced (the node API keeps `prefix_*` for routers) - and carries on from there, the
offsets continuing: no token lost or repeated.

The routers of one cluster share the key: `$RUYIFLOW_RESUME_KEY`, else the cluster secret;
`ruyiflow up` makes one for its routers when neither is set. Without a key, chunks carry no
token and a resume is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

from ruyiflow.cluster.access import cluster_secret
from ruyiflow.cluster.errors import InvalidRequest, PermissionDenied
from ruyiflow.proto import ruyiflow_pb2 as pb

RESUME_KEY_ENV = "RUYIFLOW_RESUME_KEY"


def resume_key() -> bytes | None:
    value = os.environ.get(RESUME_KEY_ENV, "")
    return value.encode() if value else cluster_secret()


def request_digest(request: pb.GenerateRequest) -> bytes:
    """What a resume token binds: the client's request, without its `resume` field."""
    plain = pb.GenerateRequest()
    plain.CopyFrom(request)
    plain.ClearField("resume")
    return hashlib.sha256(plain.SerializeToString(deterministic=True)).digest()


class StreamSigner:
    """Signs one stream as it goes: `add(ids, text)` per chunk, then `token()`."""

    def __init__(self, key: bytes, request: pb.GenerateRequest) -> None:
        self._key = key
        self._request = request_digest(request)
        self._ids = hashlib.sha256()
        self._text = hashlib.sha256()

    def add(self, token_ids: list[int] | tuple[int, ...], text: str) -> None:
        self._ids.update(struct.pack(f"<{len(token_ids)}I", *token_ids))
        self._text.update(text.encode())

    def token(self) -> bytes:
        message = self._request + self._ids.digest() + self._text.digest()
        return hmac.new(self._key, message, hashlib.sha256).digest()


def check_resume(key: bytes | None, request: pb.GenerateRequest) -> StreamSigner:
    """The signer of a resumed stream, already holding what the client received;
    PermissionDenied when the token does not match."""
    resume = request.resume
    if key is None:
        raise InvalidRequest("this router cannot resume streams (no resume key is set)")
    if len(resume.token_ids) > 1 << 16 or not resume.resume_token:
        raise InvalidRequest("resume: token_ids and a resume_token are required")
    signer = StreamSigner(key, request)
    signer.add(tuple(resume.token_ids), resume.text)
    if not hmac.compare_digest(signer.token(), resume.resume_token):
        raise PermissionDenied("resume_token does not match the request and tokens given")
    return signer
