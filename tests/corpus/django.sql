-- Django 5.x (django.db.backends.postgresql, psycopg 3, %s placeholders): introspection used by
-- inspectdb/migrate, the migration recorder, schema editor DDL and typical ORM DML.

-- expect: direct catalog  (DatabaseIntrospection.get_table_list)
SELECT
    c.relname,
    CASE
        WHEN c.relispartition THEN 'p'
        WHEN c.relkind IN ('m', 'v') THEN 'v'
        ELSE 't'
    END,
    obj_description(c.oid, 'pg_class')
FROM pg_catalog.pg_class c
LEFT JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('f', 'm', 'p', 'r', 'v')
    AND n.nspname NOT IN ('pg_catalog', 'pg_toast')
    AND pg_catalog.pg_table_is_visible(c.oid)

-- expect: direct catalog  (DatabaseIntrospection.get_table_description)
SELECT
    a.attname AS column_name,
    NOT (a.attnotnull OR (t.typtype = 'd' AND t.typnotnull)) AS is_nullable,
    pg_get_expr(ad.adbin, ad.adrelid) AS column_default,
    CASE WHEN collname = 'default' THEN NULL ELSE collname END AS collation,
    a.attidentity != '' AS is_autofield,
    col_description(a.attrelid, a.attnum) AS column_comment
FROM pg_attribute a
LEFT JOIN pg_attrdef ad ON a.attrelid = ad.adrelid AND a.attnum = ad.adnum
LEFT JOIN pg_collation co ON a.attcollation = co.oid
JOIN pg_type t ON a.atttypid = t.oid
JOIN pg_class c ON a.attrelid = c.oid
JOIN pg_namespace n ON c.relnamespace = n.oid
WHERE c.relkind IN ('f', 'm', 'p', 'r', 'v')
    AND c.relname = %s
    AND n.nspname NOT IN ('pg_catalog', 'pg_toast')
    AND pg_catalog.pg_table_is_visible(c.oid)

-- expect: pooled  (get_table_description reads cursor.description of the user table)
SELECT * FROM "polls_question" LIMIT 1

-- expect: direct catalog  (DatabaseIntrospection.get_sequences)
SELECT
    s.relname AS sequence_name,
    a.attname AS colname
FROM
    pg_class s
    JOIN pg_depend d ON d.objid = s.oid
        AND d.classid = 'pg_class'::regclass
        AND d.refclassid = 'pg_class'::regclass
    JOIN pg_attribute a ON d.refobjid = a.attrelid
        AND d.refobjsubid = a.attnum
    JOIN pg_class tbl ON tbl.oid = d.refobjid
        AND tbl.relname = %s
        AND pg_catalog.pg_table_is_visible(tbl.oid)
WHERE
    s.relkind = 'S';

-- expect: direct catalog  (DatabaseIntrospection.get_relations)
SELECT a1.attname, c2.relname, a2.attname
FROM pg_constraint con
LEFT JOIN pg_class c1 ON con.conrelid = c1.oid
LEFT JOIN pg_class c2 ON con.confrelid = c2.oid
LEFT JOIN
    pg_attribute a1 ON c1.oid = a1.attrelid AND a1.attnum = con.conkey[1]
LEFT JOIN
    pg_attribute a2 ON c2.oid = a2.attrelid AND a2.attnum = con.confkey[1]
WHERE
    c1.relname = %s AND
    con.contype = 'f' AND
    c1.relnamespace = c2.relnamespace AND
    pg_catalog.pg_table_is_visible(c1.oid)

-- expect: direct catalog  (DatabaseIntrospection.get_constraints)
SELECT
    c.conname,
    array(
        SELECT attname
        FROM unnest(c.conkey) WITH ORDINALITY cols(colid, arridx)
        JOIN pg_attribute AS ca ON cols.colid = ca.attnum
        WHERE ca.attrelid = c.conrelid
        ORDER BY cols.arridx
    ),
    c.contype,
    (SELECT fkc.relname || '.' || fka.attname
    FROM pg_attribute AS fka
    JOIN pg_class AS fkc ON fka.attrelid = fkc.oid
    WHERE fka.attrelid = c.confrelid AND fka.attnum = c.confkey[1]),
    cl.reloptions
FROM pg_constraint AS c
JOIN pg_class AS cl ON c.conrelid = cl.oid
WHERE cl.relname = %s AND pg_catalog.pg_table_is_visible(cl.oid)

-- expect: direct catalog  (DatabaseIntrospection.get_constraints, indexes)
SELECT
    indexname,
    array_agg(attname ORDER BY arridx),
    indisunique,
    indisprimary,
    array_agg(ordering ORDER BY arridx),
    amname,
    exprdef,
    s2.attoptions
FROM (
    SELECT
        c2.relname as indexname, idx.*, attr.attname, am.amname,
        CASE
            WHEN idx.indexprs IS NOT NULL THEN
                pg_get_indexdef(idx.indexrelid)
        END AS exprdef,
        CASE am.amname
            WHEN %s THEN
                CASE (option & 1)
                    WHEN 1 THEN 'DESC' ELSE 'ASC'
                END
        END as ordering,
        c2.reloptions as attoptions
    FROM (
        SELECT *
        FROM
            pg_index i,
            unnest(i.indkey, i.indoption)
                WITH ORDINALITY koi(key, option, arridx)
    ) idx
    LEFT JOIN pg_class c ON idx.indrelid = c.oid
    LEFT JOIN pg_class c2 ON idx.indexrelid = c2.oid
    LEFT JOIN pg_am am ON c2.relam = am.oid
    LEFT JOIN
        pg_attribute attr ON attr.attrelid = c.oid AND attr.attnum = idx.key
    WHERE c.relname = %s AND pg_catalog.pg_table_is_visible(c.oid)
) s2
GROUP BY indexname, indisunique, indisprimary, amname, exprdef, attoptions;

-- expect: pooled  (MigrationRecorder.applied_migrations)
SELECT "django_migrations"."id", "django_migrations"."app", "django_migrations"."name", "django_migrations"."applied" FROM "django_migrations"

-- expect: pooled  (MigrationRecorder.record_applied)
INSERT INTO "django_migrations" ("app", "name", "applied") VALUES (%s, %s, %s) RETURNING "django_migrations"."id"

-- expect: direct ddl  (MigrationRecorder.ensure_schema)
CREATE TABLE "django_migrations" ("id" bigint NOT NULL PRIMARY KEY GENERATED BY DEFAULT AS IDENTITY, "app" varchar(255) NOT NULL, "name" varchar(255) NOT NULL, "applied" timestamp with time zone NOT NULL)

-- expect: direct ddl  (schema editor)
CREATE TABLE "polls_choice" ("id" bigint NOT NULL PRIMARY KEY GENERATED BY DEFAULT AS IDENTITY, "choice_text" varchar(200) NOT NULL, "votes" integer NOT NULL, "question_id" bigint NOT NULL)

-- expect: direct ddl  (schema editor)
ALTER TABLE "polls_choice" ADD CONSTRAINT "polls_choice_question_id_c5b4b260_fk_polls_question_id" FOREIGN KEY ("question_id") REFERENCES "polls_question" ("id") DEFERRABLE INITIALLY DEFERRED

-- expect: direct ddl  (schema editor)
CREATE INDEX "polls_choice_question_id_c5b4b260" ON "polls_choice" ("question_id")

-- expect: direct ddl  (schema editor, varchar_pattern_ops index)
CREATE INDEX "auth_user_username_6821ab7c_like" ON "auth_user" ("username" varchar_pattern_ops)

-- expect: direct ddl  (schema editor, AddIndexConcurrently)
CREATE INDEX CONCURRENTLY "polls_q_pub_idx" ON "polls_question" ("pub_date")

-- expect: direct ddl  (RunSQL in a data migration)
DROP TABLE IF EXISTS "legacy_set" CASCADE

-- expect: direct catalog  (sqlsequencereset output)
SELECT setval(pg_get_serial_sequence('"polls_question"','id'), coalesce(max("id"), 1), max("id") IS NOT null) FROM "polls_question";

-- expect: direct session_set  (connection init: timezone as a session setting)
SELECT set_config('TimeZone', %s, false)

-- expect: direct set_role  (OPTIONS {"assume_role": ...})
SET ROLE "app_writer"

-- expect: pooled  (auth backend)
SELECT "auth_user"."id", "auth_user"."password", "auth_user"."last_login", "auth_user"."is_superuser", "auth_user"."username", "auth_user"."first_name", "auth_user"."last_name", "auth_user"."email", "auth_user"."is_staff", "auth_user"."is_active", "auth_user"."date_joined" FROM "auth_user" WHERE "auth_user"."username" = %s LIMIT 21

-- expect: pooled
UPDATE "auth_user" SET "last_login" = %s WHERE "auth_user"."id" = %s

-- expect: pooled  (exists())
SELECT 1 AS "a" FROM "django_session" WHERE "django_session"."session_key" = %s LIMIT 1

-- expect: pooled  (session cleanup with an IN list)
DELETE FROM "django_session" WHERE "django_session"."session_key" IN (%s, %s, %s)

-- expect: pooled  (bulk_create(ignore_conflicts=True))
INSERT INTO "polls_choice" ("choice_text", "votes", "question_id") VALUES (%s, %s, %s), (%s, %s, %s) ON CONFLICT DO NOTHING RETURNING "polls_choice"."id"

-- expect: pooled  (select_for_update(skip_locked=True))
SELECT "jobs_job"."id", "jobs_job"."payload" FROM "jobs_job" WHERE "jobs_job"."state" = %s ORDER BY "jobs_job"."id" ASC LIMIT 10 FOR UPDATE SKIP LOCKED

-- expect: pooled  (annotate + Extract; FROM inside extract())
SELECT EXTRACT(YEAR FROM "polls_question"."pub_date" AT TIME ZONE 'UTC') AS "year", COUNT("polls_question"."id") AS "n" FROM "polls_question" GROUP BY 1 ORDER BY 1

-- expect: pooled  (a model whose table is named pg_notes)
SELECT "pg_notes"."id", "pg_notes"."body" FROM "pg_notes" WHERE "pg_notes"."body"::text LIKE %s ESCAPE '\'

-- expect: pooled  (SET LOCAL inside atomic() is transaction-scoped)
SET LOCAL statement_timeout = '5s'
