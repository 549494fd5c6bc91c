-- Typical application DML through asyncpg / psycopg, written to trip a careless classifier:
-- keyword-like identifiers, DDL inside literals and comments, pg_-prefixed user tables.

-- expect: pooled
SELECT id, email FROM users WHERE id = $1

-- expect: pooled
INSERT INTO orders (user_id, total_cents, note) VALUES ($1, $2, 'DROP TABLE orders; --') RETURNING id, created_at

-- expect: pooled
INSERT INTO settings ("key", "value") VALUES ($1, $2) ON CONFLICT ("key") DO UPDATE SET "value" = EXCLUDED."value", updated_at = now()

-- expect: pooled
UPDATE accounts SET balance = balance - $1 WHERE id = $2 AND balance >= $1 RETURNING balance

-- expect: pooled
DELETE FROM sessions WHERE expires_at < now() - interval '30 days'

-- expect: pooled  (data-modifying CTE)
WITH moved AS (DELETE FROM inbox WHERE processed RETURNING *) INSERT INTO archive SELECT * FROM moved

-- expect: pooled
MERGE INTO inventory AS i USING incoming AS n ON i.sku = n.sku WHEN MATCHED THEN UPDATE SET qty = i.qty + n.qty WHEN NOT MATCHED THEN INSERT (sku, qty) VALUES (n.sku, n.qty)

-- expect: pooled  (job queue)
UPDATE jobs SET locked_at = now(), locked_by = $1 WHERE id = (SELECT id FROM jobs WHERE locked_at IS NULL AND run_at <= now() ORDER BY priority, id FOR UPDATE SKIP LOCKED LIMIT 1) RETURNING id, payload

-- expect: pooled  (table and columns named like statements)
SELECT "set", "listen", "create_at", "drop", "grant" FROM "table" WHERE "select" = $1

-- expect: pooled
SELECT create_at, listen, prepare_count, copy_of, declare_date FROM events WHERE set_id = $1

-- expect: pooled  (a user table named pg_notes, unqualified and public-qualified)
SELECT n.id, n.body FROM pg_notes n JOIN public.pg_notes_tags t ON t.note_id = n.id

-- expect: pooled  (columns and aliases named like catalogs)
SELECT "pg_class", pg_namespace, relname AS "pg_attribute" FROM app_objects AS pg_index WHERE pg_type = $1

-- expect: pooled  (a schema-qualified user table that shares a catalog's name)
SELECT * FROM myapp.pg_class WHERE id = $1

-- expect: pooled  (DDL in comments and literals)
/* CREATE TABLE x (); SET ROLE admin; */ SELECT 'LISTEN foo; PREPARE p AS SELECT 1' AS txt, $$DROP SCHEMA public$$ AS body, E'pg_catalog.pg_class \' SET search_path' -- DROP DATABASE prod
FROM notes

-- expect: pooled  (regclass cast in a column default lookup)
SELECT nextval('orders_id_seq'::regclass)

-- expect: pooled
SELECT u.id, json_agg(json_build_object('id', p.id, 'title', p.title) ORDER BY p.id) AS posts FROM users u LEFT JOIN LATERAL (SELECT * FROM posts WHERE posts.user_id = u.id ORDER BY created_at DESC LIMIT 5) p ON true GROUP BY u.id

-- expect: pooled
SELECT id FROM documents WHERE tags @> ARRAY[$1]::text[] AND meta->>'kind' = $2 AND body ILIKE '%' || $3 || '%'

-- expect: pooled  (window function, IS DISTINCT FROM)
SELECT id, amount, sum(amount) OVER (PARTITION BY account_id ORDER BY id) FROM ledger WHERE prev IS DISTINCT FROM amount

-- expect: pooled
SELECT date_trunc('day', created_at) AS day, count(*) FROM events WHERE created_at >= $1 GROUP BY 1 ORDER BY 1

-- expect: pooled  (psycopg placeholders)
SELECT * FROM users WHERE email = %(email)s AND org_id = %s AND name LIKE 'a%%'

-- expect: pooled  (VALUES and TABLE)
VALUES (1, 'one'), (2, 'two')

-- expect: pooled
TABLE users

-- expect: pooled  (parenthesised set operation)
(SELECT id FROM a) UNION ALL (SELECT id FROM b) ORDER BY 1

-- expect: pooled
TRUNCATE TABLE staging_events RESTART IDENTITY

-- expect: pooled
BEGIN ISOLATION LEVEL SERIALIZABLE; UPDATE counters SET n = n + 1 WHERE id = 1; COMMIT;

-- expect: pooled
SAVEPOINT sp1

-- expect: pooled
RELEASE SAVEPOINT sp1

-- expect: pooled
LOCK TABLE accounts IN SHARE ROW EXCLUSIVE MODE

-- expect: pooled
NOTIFY cache_invalidation, 'users:42'

-- expect: pooled
CALL refresh_rollups($1)

-- expect: pooled  (EXPLAIN of DML)
EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) SELECT * FROM orders WHERE user_id = $1

-- expect: pooled  (asyncpg copy_records_to_table)
COPY "public"."events"("id","kind","payload") FROM STDIN (FORMAT binary)

-- expect: pooled  (asyncpg copy_from_query)
COPY (SELECT id, email FROM users WHERE created_at > '2024-01-01') TO STDOUT (FORMAT csv, HEADER true)

-- expect: pooled  (psycopg cursor.copy)
COPY items (sku, qty) FROM STDIN WITH (FORMAT csv)

-- expect: pooled  (psycopg server-side cursor: scoped to the transaction)
DECLARE "c_7f3a" CURSOR FOR SELECT * FROM big_table

-- expect: pooled
FETCH FORWARD 100 FROM "c_7f3a"

-- expect: pooled
CLOSE "c_7f3a"

-- expect: pooled  (transaction-scoped advisory lock)
SELECT pg_advisory_xact_lock(42)

-- expect: pooled
SELECT pg_try_advisory_xact_lock(hashtext('report:' || $1))

-- expect: pooled  (functions that look introspective but are not catalog reads)
SELECT pg_backend_pid(), pg_sleep(0), pg_typeof(1), txid_current(), now(), current_setting('TimeZone')

-- expect: pooled  (monitoring-ish function on the user's own tables)
SELECT pg_total_relation_size('public.orders')

-- expect: pooled  (unknown / empty input stays pooled)
;

-- expect: pooled  (upsert into a table named set)
INSERT INTO "set" (id, listen) VALUES (1, true) ON CONFLICT (id) DO UPDATE SET listen = excluded.listen
