"""The one bearer-token check of layercast's admin routes (engine-independent).

`check_bearer(authorization, token)` is used twice with the same answers: by
`rpc.server.middleware.AdminGuard`, which refuses before a single body byte is read, and by the route
dependency `rpc.server.routes.bearer_auth` (defense in depth, and what declares the scheme in OpenAPI).
The compare is constant-time (`secrets.compare_digest`) and neither the token nor what was sent ever
appears in an answer.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

MISSING_TOKEN = "missing bearer token: send 'Authorization: Bearer <token>'"
WRONG_TOKEN = "wrong bearer token"


@dataclass(frozen=True)
class AuthFailure:
    """Why a request is refused: 401 (no bearer token) or 403 (a wrong one), with its headers."""

    status_code: int
    detail: str
    headers: dict[str, str] = field(default_factory=dict)


def check_bearer(authorization: str | None, token: str | None) -> AuthFailure | None:
    """None when the request may pass: the server has no token, or `Authorization: Bearer <token>`."""
    if not token:
        return None
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        return AuthFailure(401, MISSING_TOKEN, {"WWW-Authenticate": "Bearer"})
    if not secrets.compare_digest(given.strip().encode(), token.encode()):
        return AuthFailure(403, WRONG_TOKEN)
    return None
