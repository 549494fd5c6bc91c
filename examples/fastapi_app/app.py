"""A FastAPI app on poolkit: ``POOLKIT_POOLED_URL=... uvicorn examples.fastapi_app.app:app``.

The lifespan opens the pool at startup (a bad URL stops the app before it serves) and drains it at
shutdown; handlers get the pool by dependency and run per-user queries under RLS claims.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Header

from poolkit.integrations.fastapi import PoolDep, lifespan

app = FastAPI(lifespan=lifespan(application_name="fastapi-example"))


@app.get("/healthz")
async def healthz(pool: PoolDep) -> dict[str, Any]:
    return {"db": await pool.fetchval("SELECT 1"), "mode": pool.mode.value}


@app.get("/whoami")
async def whoami(pool: PoolDep, x_user_id: str | None = Header(default=None)) -> dict[str, Any]:
    # In a real app the claims come from the verified JWT, and role="authenticated" lets RLS policies apply.
    claims = {"sub": x_user_id, "role": "authenticated"} if x_user_id else None
    async with pool.as_user(claims, role=None) as conn:
        row = await conn.fetchrow("SELECT current_user, current_setting('request.jwt.claim.sub', true)")
    return {"db_user": row[0], "sub": row[1] or None}
