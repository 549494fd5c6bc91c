-- Session-level features that must go direct, with their reasons; plus driver introspection.

-- expect: direct session_set
SET search_path TO app, public

-- expect: direct session_set
set statement_timeout = 5000

-- expect: direct session_set
SET TIME ZONE 'Europe/Berlin'

-- expect: direct session_set
RESET search_path

-- expect: direct session_set
RESET ALL

-- expect: direct session_set
SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE

-- expect: direct session_set
DISCARD ALL

-- expect: direct session_set
LOAD 'auto_explain'

-- expect: direct set_role
SET ROLE admin

-- expect: direct set_role
SET SESSION ROLE admin

-- expect: direct set_role
SET SESSION AUTHORIZATION DEFAULT

-- expect: direct set_role
RESET ROLE

-- expect: pooled
SET LOCAL ROLE reporting

-- expect: pooled
SET CONSTRAINTS ALL DEFERRED

-- expect: direct advisory_lock
SELECT pg_advisory_lock(hashtext('migrations'))

-- expect: direct advisory_lock
SELECT pg_catalog.pg_advisory_lock_shared(1, 2)

-- expect: direct advisory_lock
SELECT pg_advisory_unlock_all()

-- expect: direct listen
LISTEN "order_events"

-- expect: direct listen
UNLISTEN *

-- expect: direct prepare
PREPARE get_user (int) AS SELECT * FROM users WHERE id = $1

-- expect: direct prepare
EXECUTE get_user(42)

-- expect: direct prepare
DEALLOCATE ALL

-- expect: pooled  (two-phase commit is transaction-level)
PREPARE TRANSACTION 'tx-42'

-- expect: pooled
COMMIT PREPARED 'tx-42'

-- expect: direct hold_cursor  (psycopg ServerCursor(withhold=True))
DECLARE "export_cursor" NO SCROLL CURSOR WITH HOLD FOR SELECT * FROM events ORDER BY id

-- expect: pooled
DECLARE c CURSOR WITHOUT HOLD FOR SELECT 1

-- expect: direct temp_table
CREATE TEMPORARY TABLE tmp_ids (id bigint PRIMARY KEY)

-- expect: direct temp_table
CREATE LOCAL TEMP TABLE tmp_x AS SELECT * FROM users WHERE false

-- expect: direct temp_table
SELECT id, email INTO TEMP TABLE active_users FROM users WHERE active

-- expect: direct ddl  (SELECT INTO creates a permanent table)
SELECT * INTO users_backup FROM users

-- expect: direct temp_table
INSERT INTO pg_temp.tmp_ids SELECT id FROM users

-- expect: direct copy  (server-side file)
COPY items FROM '/var/lib/postgresql/import/items.csv' WITH (FORMAT csv, HEADER)

-- expect: direct copy
COPY (SELECT * FROM items) TO PROGRAM 'gzip > /tmp/items.csv.gz'

-- expect: direct ddl
VACUUM (ANALYZE) orders

-- expect: direct ddl
ANALYZE orders

-- expect: direct ddl
REINDEX INDEX CONCURRENTLY orders_user_id_idx

-- expect: direct ddl
CLUSTER orders USING orders_pkey

-- expect: direct ddl
REFRESH MATERIALIZED VIEW CONCURRENTLY daily_totals

-- expect: direct ddl
CREATE MATERIALIZED VIEW daily_totals AS SELECT date_trunc('day', created_at) d, sum(total) FROM orders GROUP BY 1

-- expect: direct ddl
DROP TABLE IF EXISTS old_orders

-- expect: direct ddl
ALTER SYSTEM SET log_min_duration_statement = '250ms'

-- expect: direct ddl
SECURITY LABEL FOR selinux ON TABLE orders IS 'system_u:object_r:sepgsql_table_t:s0'

-- expect: direct ddl
IMPORT FOREIGN SCHEMA remote FROM SERVER films INTO films

-- expect: direct ddl
EXPLAIN ANALYZE CREATE TABLE t2 AS SELECT * FROM t1

-- expect: direct ddl  (multi-statement: any direct statement sends the whole string direct)
BEGIN; INSERT INTO audit VALUES (1); CREATE INDEX ON audit (id); COMMIT;

-- expect: direct session_set  (first direct statement gives the reason)
SELECT 1; SET search_path = app; CREATE TABLE z (a int);

-- expect: direct catalog  (asyncpg type introspection)
WITH RECURSIVE typeinfo_tree(
    oid, ns, name, kind, basetype, elemtype, elemdelim,
    range_subtype, attrtypoids, attrnames, depth)
AS (
    SELECT
        ti.oid, ti.ns, ti.name, ti.kind, ti.basetype,
        ti.elemtype, ti.elemdelim, ti.range_subtype,
        ti.attrtypoids, ti.attrnames, 0
    FROM
        (
        SELECT
            t.oid AS oid,
            ns.nspname AS ns,
            t.typname AS name,
            t.typtype AS kind,
            (CASE WHEN t.typtype = 'd' THEN
                (WITH RECURSIVE typebases(oid, depth) AS (
                    SELECT t2.typbasetype AS oid, 0 AS depth
                    FROM pg_type t2
                    WHERE t2.oid = t.oid
                    UNION ALL
                    SELECT t2.typbasetype AS oid, tb.depth + 1 AS depth
                    FROM pg_type t2, typebases tb
                    WHERE tb.oid = t2.oid AND t2.typbasetype != 0
                ) SELECT oid FROM typebases ORDER BY depth DESC LIMIT 1)
            ELSE NULL
            END) AS basetype,
            t.typelem AS elemtype,
            elem_t.typdelim AS elemdelim,
            range_t.rngsubtype AS range_subtype,
            (CASE WHEN t.typtype = 'c' THEN
                (SELECT array_agg(ia.atttypid ORDER BY ia.attnum)
                FROM pg_attribute ia
                INNER JOIN pg_class c ON (ia.attrelid = c.oid)
                WHERE ia.attnum > 0 AND NOT ia.attisdropped AND c.reltype = t.oid)
            ELSE NULL
            END) AS attrtypoids,
            (CASE WHEN t.typtype = 'c' THEN
                (SELECT array_agg(ia.attname::text ORDER BY ia.attnum)
                FROM pg_attribute ia
                INNER JOIN pg_class c ON (ia.attrelid = c.oid)
                WHERE ia.attnum > 0 AND NOT ia.attisdropped AND c.reltype = t.oid)
            ELSE NULL
            END) AS attrnames
        FROM
            pg_catalog.pg_type AS t
            INNER JOIN pg_catalog.pg_namespace ns ON (ns.oid = t.typnamespace)
            LEFT JOIN pg_type elem_t ON (t.typlen = -1 AND t.typelem != 0 AND t.typelem = elem_t.oid)
            LEFT JOIN pg_range range_t ON (t.oid = range_t.rngtypid)
        ) AS ti
    WHERE
        ti.oid = any($1::oid[])
    UNION ALL
    SELECT
        ti.oid, ti.ns, ti.name, ti.kind, ti.basetype,
        ti.elemtype, ti.elemdelim, ti.range_subtype,
        ti.attrtypoids, ti.attrnames, tt.depth + 1
    FROM
        typeinfo_tree tt
    WHERE
        tt.elemtype IS NOT NULL
)
SELECT DISTINCT *, basetype::regtype::text AS basetype_name, elemtype::regtype::text AS elemtype_name, range_subtype::regtype::text AS range_subtype_name
FROM typeinfo_tree
ORDER BY depth DESC

-- expect: direct catalog  (psycopg TypeInfo.fetch)
SELECT
    typname AS name, oid, typarray AS array_oid,
    oid::regtype::text AS regtype, typdelim AS delimiter
FROM pg_type t
WHERE t.oid = to_regtype(%(name)s)
ORDER BY t.oid

-- expect: direct catalog  (monitoring dashboard)
SELECT pid, state, wait_event_type, query_start, left(query, 100) FROM pg_stat_activity WHERE datname = current_database()

-- expect: direct catalog  (quoted catalog names are still catalogs)
SELECT "relname" FROM "pg_catalog"."pg_class" WHERE "relkind" = 'r'

-- expect: direct catalog
TABLE pg_roles
