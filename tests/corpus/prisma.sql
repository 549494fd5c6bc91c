-- Prisma 5 (migrate engine and query engine, $n placeholders, everything quoted).

-- expect: direct advisory_lock  (prisma migrate takes a session advisory lock)
SELECT pg_advisory_lock(72707369)

-- expect: direct advisory_lock
SELECT pg_advisory_unlock(72707369)

-- expect: direct ddl
CREATE TABLE IF NOT EXISTS "_prisma_migrations" (
    "id"                    VARCHAR(36) PRIMARY KEY NOT NULL,
    "checksum"              VARCHAR(64) NOT NULL,
    "finished_at"           TIMESTAMPTZ,
    "migration_name"        VARCHAR(255) NOT NULL,
    "logs"                  TEXT,
    "rolled_back_at"        TIMESTAMPTZ,
    "started_at"            TIMESTAMPTZ NOT NULL DEFAULT now(),
    "applied_steps_count"   INTEGER NOT NULL DEFAULT 0
);

-- expect: pooled
SELECT "id", "checksum", "finished_at", "migration_name", "logs", "rolled_back_at", "started_at", "applied_steps_count" FROM "_prisma_migrations" ORDER BY "started_at" ASC

-- expect: pooled
INSERT INTO "_prisma_migrations" ("id","checksum","logs","started_at","finished_at","migration_name","applied_steps_count") VALUES ($1,$2,$3,now(),$4,$5,$6)

-- expect: pooled
UPDATE "_prisma_migrations" SET "finished_at" = now(), "applied_steps_count" = "applied_steps_count" + 1 WHERE "id" = $1

-- expect: direct catalog  (schema describer: namespaces)
SELECT namespace.nspname AS namespace_name
FROM pg_namespace AS namespace
WHERE namespace.nspname = ANY ( $1 )
ORDER BY namespace_name

-- expect: direct catalog  (schema describer: columns)
SELECT
    oid.namespace,
    info.table_name,
    info.column_name,
    format_type(att.atttypid, att.atttypmod) as formatted_type,
    info.numeric_precision,
    info.numeric_scale,
    info.numeric_precision_radix,
    info.datetime_precision,
    info.data_type,
    info.udt_schema as type_schema_name,
    info.udt_name as full_data_type,
    pg_get_expr(attdef.adbin, attdef.adrelid) AS column_default,
    info.is_nullable,
    info.is_identity,
    info.character_maximum_length,
    col_description(att.attrelid, ordinal_position) AS description
FROM information_schema.columns info
JOIN pg_attribute att ON att.attname = info.column_name
JOIN (
     SELECT pg_class.oid, relname, pg_namespace.nspname as namespace
     FROM pg_class
     JOIN pg_namespace on pg_namespace.oid = pg_class.relnamespace
     AND pg_namespace.nspname = ANY ( $1 )
    ) as oid on oid.oid = att.attrelid
      AND relname = info.table_name
      AND namespace = info.table_schema
LEFT OUTER JOIN pg_attrdef attdef ON attdef.adrelid = att.attrelid AND attdef.adnum = att.attnum AND table_schema = namespace
WHERE table_schema = ANY ( $1 )
ORDER BY namespace, table_name, ordinal_position;

-- expect: direct catalog  (schema describer: enums)
SELECT t.typname as name, e.enumlabel as value, n.nspname as namespace, obj_description(t.oid, 'pg_type') as description
FROM pg_type t
JOIN pg_enum e ON t.oid = e.enumtypid
JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace
WHERE n.nspname = ANY ( $1 )
ORDER BY e.enumsortorder

-- expect: direct catalog  (schema describer: sequences, information_schema only)
SELECT sequence_name, sequence_schema AS namespace, start_value::INT8, minimum_value::INT8 AS min_value, maximum_value::INT8 AS max_value, increment::INT8 AS increment_by, (CASE cycle_option WHEN 'yes' THEN TRUE ELSE FALSE END) AS cycle, 0::INT8 AS cache_size
FROM information_schema.sequences
WHERE sequence_schema = ANY ( $1 )
ORDER BY sequence_name

-- expect: direct catalog  (schema describer: extensions)
SELECT ext.extname AS extension_name, ext.extversion AS extension_version, ext.extrelocatable AS extension_relocatable, pn.nspname AS extension_schema
FROM pg_extension ext
INNER JOIN pg_namespace pn ON ext.extnamespace = pn.oid
ORDER BY ext.extname ASC

-- expect: pooled  (migrate: version check through the pooler is fine)
SELECT version()

-- expect: pooled  (query engine: findUnique)
SELECT "public"."User"."id", "public"."User"."email", "public"."User"."name" FROM "public"."User" WHERE ("public"."User"."email" = $1 AND 1=1) LIMIT $2 OFFSET $3

-- expect: pooled  (query engine: create with RETURNING)
INSERT INTO "public"."Post" ("title","content","published","authorId") VALUES ($1,$2,$3,$4) RETURNING "public"."Post"."id", "public"."Post"."title", "public"."Post"."published"

-- expect: pooled  (query engine: relation load with IN list)
SELECT "public"."Post"."id", "public"."Post"."authorId" FROM "public"."Post" WHERE "public"."Post"."authorId" IN ($1,$2,$3,$4) OFFSET $5

-- expect: pooled  (query engine: interactive transaction)
BEGIN

-- expect: pooled  (query engine: a model whose columns are named like keywords)
UPDATE "public"."Setting" SET "set" = $1, "listen" = $2, "create_at" = $3 WHERE ("public"."Setting"."id" = $4 AND 1=1) RETURNING "public"."Setting"."id"

-- expect: pooled  ($queryRaw with DDL words in a literal)
SELECT "id" FROM "AuditLog" WHERE "action" IN ('DROP TABLE', 'CREATE INDEX', 'SET ROLE', 'LISTEN') ORDER BY "id" DESC LIMIT $1

-- expect: direct ddl  (migration.sql)
ALTER TABLE "Post" ADD CONSTRAINT "Post_authorId_fkey" FOREIGN KEY ("authorId") REFERENCES "User"("id") ON DELETE RESTRICT ON UPDATE CASCADE;

-- expect: direct ddl  (migration.sql)
CREATE UNIQUE INDEX "User_email_key" ON "User"("email");
