"""Public import path of RLS-scoped sessions: one transaction as a Supabase-style user (JWT claims + role).

The public names, from where they live: the claims as SQL (``rls_claims``), the async session (``rls_async``)
and the sync one generated from it (``rls_sync``).
"""

from __future__ import annotations

from poolkit.pool.rls_async import UserSession, as_user
from poolkit.pool.rls_claims import CLAIMS_SETTING, SUB_SETTING, claims_json, quote_role
from poolkit.pool.rls_sync import SyncUserSession, as_user_sync

__all__ = [
    "CLAIMS_SETTING",
    "SUB_SETTING",
    "SyncUserSession",
    "UserSession",
    "as_user",
    "as_user_sync",
    "claims_json",
    "quote_role",
]
