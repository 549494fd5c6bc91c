"""Supabase-style request claims as SQL, pure: the JWT claims as JSON, the ``sub`` claim, a checked role name."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from poolkit.errors import ConfigError

# PostgREST/Supabase read these: `auth.uid()` reads request.jwt.claim.sub in older projects and
# request.jwt.claims ->> 'sub' in newer ones, so both are set.
CLAIMS_SETTING = "request.jwt.claims"
SUB_SETTING = "request.jwt.claim.sub"

_MAX_IDENTIFIER_BYTES = 63

# One round trip for both settings. `true` = is_local: the values end with the transaction, which is
# what makes this safe through a transaction pooler (the next client on the server connection sees '').
#: Numbered $n in argument order (claims JSON, sub): each driver's ``sql()`` puts it in its own style.
SET_CLAIMS = f"SELECT set_config('{CLAIMS_SETTING}', $1, true), set_config('{SUB_SETTING}', $2, true)"


def quote_role(role: str) -> str:
    """``role`` as a quoted SQL identifier, after checking it is a usable role name.

    ``SET ROLE`` takes no bind parameter, so the name is quoted here; quoting (not a character
    allow-list) is what stops injection, the checks only turn obvious mistakes into clear errors.
    """
    if not isinstance(role, str) or not role.strip():
        raise ConfigError("role is empty: pass a role name such as 'authenticated' or 'anon', or role=None")
    if "\x00" in role:
        raise ConfigError("role contains a NUL character, which PostgreSQL identifiers cannot hold")
    if len(role.encode()) > _MAX_IDENTIFIER_BYTES:
        raise ConfigError(f"role is {len(role.encode())} bytes long; PostgreSQL role names are at most 63 bytes")
    if role.lower() in ("none", "default", "public", "session_user", "current_user"):
        # `SET ROLE NONE` resets; quoted, these would name a (nonexistent) role — either way not what is meant.
        raise ConfigError(f"role {role!r} is a keyword, not a role: pass the role to run as, or role=None")
    return '"' + role.replace('"', '""') + '"'


def claims_json(claims: Mapping[str, Any] | None) -> tuple[str, str]:
    """The claims as JSON text and the ``sub`` claim as text ('' when absent)."""
    if claims is None:
        return "", ""
    if not isinstance(claims, Mapping):
        raise ConfigError(f"claims must be a mapping (the decoded JWT payload), not {type(claims).__name__}")
    try:
        text = json.dumps(dict(claims), separators=(",", ":"), sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"claims cannot be encoded as JSON ({exc}); pass the decoded JWT payload") from None
    sub = claims.get("sub")
    return text, "" if sub is None else str(sub)
