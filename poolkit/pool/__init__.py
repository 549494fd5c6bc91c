"""The library pools: async (asyncpg, psycopg) and sync (psycopg), their driver adapters, registry and RLS sessions."""
