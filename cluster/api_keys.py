"""Client API keys of the router: `router.api_keys_env` names an environment variable holding
the accepted keys (comma- or newline-separated). Clients send `authorization: Bearer KEY` - as
gRPC metadata on Router calls, as the HTTP header on the OpenAI API. A missing or unknown key
is UNAUTHENTICATED (HTTP 401).

Keys are compared in constant time against every accepted key (no early exit that would tell
how many matched), and neither a key nor the header is ever logged or put in an error.
"""

from __future__ import annotations

import hmac
import os
import re
from collections.abc import Sequence

import grpc

from ruyiflow.cluster.access import MethodGuard
from ruyiflow.cluster.errors import TopologyError, Unauthenticated

ROUTER_SERVICE_PREFIX = "/ruyiflow.v1.Router/"
AUTHORIZATION = "authorization"
CLIENT_KEY_ENV = "RUYIFLOW_API_KEY"  # what the project's own clients send, when set
_BEARER = re.compile(r"Bearer[ \t]+(\S+)[ \t]*", re.IGNORECASE)


class ApiKeys:
    """The accepted keys (at least one)."""

    def __init__(self, keys: Sequence[str]) -> None:
        self._keys = tuple(k.encode() for k in keys if k)
        if not self._keys:
            raise ValueError("no API key given")

    @classmethod
    def from_env(cls, name: str | None) -> ApiKeys | None:
        """Keys from variable `name` (None: keys are off). TopologyError when it is not set."""
        if name is None:
            return None
        keys = [k.strip() for k in re.split(r"[,\n]", os.environ.get(name, ""))]
        if not any(keys):
            raise TopologyError(f"names ${name}, which holds no key", "router.api_keys_env")
        return cls(keys)

    def is_valid(self, key: str) -> bool:
        given = key.encode()
        found = False
        for accepted in self._keys:  # every key is compared: the time does not tell which
            found |= hmac.compare_digest(given, accepted)
        return found

    def check_header(self, value: str | None) -> None:
        """Unauthenticated unless `value` is `Bearer <an accepted key>`."""
        match = _BEARER.fullmatch(value or "")
        if match is None:
            raise Unauthenticated("an API key is required: send 'authorization: Bearer <key>'")
        if not self.is_valid(match.group(1)):
            raise Unauthenticated("the API key is not valid")

    def check_call(self, method: str, context: grpc.ServicerContext) -> None:
        value = None
        for item in context.invocation_metadata() or ():
            if item.key == AUTHORIZATION:
                value = item.value if isinstance(item.value, str) else item.value.decode()
        self.check_header(value)


def api_key_guard(keys: ApiKeys) -> MethodGuard:
    """The interceptor that checks keys on every Router method (health stays open)."""
    return MethodGuard(ROUTER_SERVICE_PREFIX, keys.check_call)


def client_key(explicit: str | None = None, keys_env: str | None = None) -> str | None:
    """The key a project client sends: `explicit`, else $RUYIFLOW_API_KEY, else (commands
    run beside the router, such as `ruyiflow up`) the first key of the topology's
    `router.api_keys_env`, else none."""
    if explicit or os.environ.get(CLIENT_KEY_ENV):
        return explicit or os.environ.get(CLIENT_KEY_ENV)
    if keys_env is not None:
        first = re.split(r"[,\n]", os.environ.get(keys_env, ""))[0].strip()
        return first or None
    return None


def key_metadata(key: str | None) -> tuple[tuple[str, str], ...]:
    """gRPC call metadata carrying `key` (none without one)."""
    return ((AUTHORIZATION, f"Bearer {key}"),) if key else ()
