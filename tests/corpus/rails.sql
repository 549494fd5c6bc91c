-- Rails 7 ActiveRecord PostgreSQLAdapter: connection configuration, schema cache / migrations
-- introspection, migration advisory lock and typical model DML ($n placeholders).

-- expect: direct session_set  (configure_connection)
SET client_min_messages TO 'warning'

-- expect: direct session_set  (configure_connection)
SET standard_conforming_strings = on

-- expect: direct session_set  (configure_connection, variables:)
SET SESSION timezone TO 'UTC'

-- expect: direct session_set
SET intervalstyle = iso_8601

-- expect: pooled
SHOW search_path

-- expect: direct catalog  (load_additional_types)
SELECT t.oid, t.typname, t.typelem, t.typdelim, t.typinput, r.rngsubtype, t.typtype, t.typbasetype
FROM pg_type as t
LEFT JOIN pg_range as r ON oid = rngtypid
WHERE
  t.typname IN ('int2', 'int4', 'int8', 'oid', 'float4', 'float8', 'numeric', 'bool', 'timestamp', 'timestamptz')

-- expect: direct catalog  (data_source_sql / table_exists?)
SELECT c.relname FROM pg_class c LEFT JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = ANY (current_schemas(false)) AND c.relname = 'schema_migrations' AND c.relkind IN ('r','p')

-- expect: direct catalog  (column_definitions)
SELECT a.attname, format_type(a.atttypid, a.atttypmod),
       pg_get_expr(d.adbin, d.adrelid), a.attnotnull, a.atttypid, a.atttypmod,
       c.collname, col_description(a.attrelid, a.attnum) AS comment,
       attidentity AS identity,
       attgenerated as attgenerated
  FROM pg_attribute a
  LEFT JOIN pg_attrdef d ON a.attrelid = d.adrelid AND a.attnum = d.adnum
  LEFT JOIN pg_type t ON a.atttypid = t.oid
  LEFT JOIN pg_collation c ON a.attcollation = c.oid AND a.attcollation <> t.typcollation
 WHERE a.attrelid = '"users"'::regclass
   AND a.attnum > 0 AND NOT a.attisdropped
 ORDER BY a.attnum

-- expect: direct catalog  (primary_keys)
SELECT a.attname
  FROM (
         SELECT indrelid, indkey, generate_subscripts(indkey, 1) idx
           FROM pg_index
          WHERE indrelid = '"users"'::regclass
            AND indisprimary
       ) i
  JOIN pg_attribute a
    ON a.attrelid = i.indrelid
   AND a.attnum = i.indkey[i.idx]
 ORDER BY i.idx

-- expect: direct catalog  (indexes)
SELECT distinct i.relname, d.indisunique, d.indkey, pg_get_indexdef(d.indexrelid), t.oid,
                pg_catalog.obj_description(i.oid, 'pg_class') AS comment, d.indisvalid
FROM pg_class t
INNER JOIN pg_index d ON t.oid = d.indrelid
INNER JOIN pg_class i ON d.indexrelid = i.oid
LEFT JOIN pg_namespace n ON n.oid = t.relnamespace
WHERE i.relkind IN ('i', 'I')
  AND d.indisprimary = 'f'
  AND t.relname = 'users'
  AND n.nspname = ANY (current_schemas(false))
ORDER BY i.relname

-- expect: direct catalog  (pk_and_sequence_for, reset_pk_sequence!)
SELECT pg_get_serial_sequence('"users"', 'id')

-- expect: direct advisory_lock  (with_advisory_lock around migrations)
SELECT pg_try_advisory_lock(3355337542106213495)

-- expect: direct advisory_lock
SELECT pg_advisory_unlock(3355337542106213495)

-- expect: pooled
SELECT "schema_migrations"."version" FROM "schema_migrations" ORDER BY "schema_migrations"."version" ASC

-- expect: pooled
INSERT INTO "schema_migrations" ("version") VALUES ($1) RETURNING "version"

-- expect: pooled
SELECT "ar_internal_metadata"."value" FROM "ar_internal_metadata" WHERE "ar_internal_metadata"."key" = $1 LIMIT $2

-- expect: direct ddl
CREATE TABLE "users" ("id" bigserial primary key, "email" character varying NOT NULL, "created_at" timestamp(6) NOT NULL, "updated_at" timestamp(6) NOT NULL)

-- expect: direct ddl
CREATE UNIQUE INDEX "index_users_on_email" ON "users" ("email")

-- expect: direct ddl  (enable_extension)
CREATE EXTENSION IF NOT EXISTS "pgcrypto"

-- expect: pooled  (find)
SELECT "users".* FROM "users" WHERE "users"."id" = $1 LIMIT $2

-- expect: pooled  (upsert_all)
INSERT INTO "users" ("email","created_at","updated_at") VALUES ('a@example.com', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP) ON CONFLICT ("email") DO UPDATE SET updated_at=(CASE WHEN ("users"."email" IS NOT DISTINCT FROM excluded."email") THEN "users".updated_at ELSE CURRENT_TIMESTAMP END),"email"=excluded."email" RETURNING "id"

-- expect: pooled  (includes: preloading with IN)
SELECT "posts".* FROM "posts" WHERE "posts"."user_id" IN ($1, $2, $3)

-- expect: pooled  (pluck with a column named listen on a table named set)
SELECT "set"."listen" FROM "set" WHERE "set"."create_at" > $1

-- expect: pooled  (GoodJob-style transaction-scoped lock)
SELECT pg_advisory_xact_lock(hashtext($1))

-- expect: direct advisory_lock  (GoodJob / que: session advisory lock inside a CTE)
WITH rows AS (
  SELECT "good_jobs"."id" FROM "good_jobs" WHERE "good_jobs"."finished_at" IS NULL ORDER BY priority DESC NULLS LAST LIMIT 1000
)
SELECT "good_jobs".* FROM "good_jobs" WHERE "good_jobs"."id" IN (
  WITH rows AS (SELECT id FROM rows)
  SELECT id FROM rows WHERE pg_try_advisory_lock(('x' || substr(md5('good_jobs' || '-' || id::text), 1, 16))::bit(64)::bigint)
  LIMIT 1
) ORDER BY priority DESC NULLS LAST
