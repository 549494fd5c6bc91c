-- Supabase: PostgREST request setup and RLS queries, auth helpers, realtime/storage calls,
-- and `supabase db push` migrations.

-- expect: pooled  (PostgREST per-request settings: transaction-local set_config)
select set_config('search_path', $1, true), set_config('role', $2, true), set_config('request.jwt.claims', $3, true), set_config('request.method', $4, true), set_config('request.path', $5, true), set_config('request.headers', $6, true), set_config('request.cookies', $7, true)

-- expect: pooled  (PostgREST read; pg_catalog.count is an aggregate, not a catalog read)
WITH pgrst_source AS ( SELECT "public"."todos".* FROM "public"."todos"  WHERE  "public"."todos"."user_id" = $1  LIMIT $2 OFFSET $3 ) SELECT null::bigint AS total_result_set, pg_catalog.count(_postgrest_t) AS page_total, coalesce(json_agg(_postgrest_t), '[]') AS body, nullif(current_setting('response.headers', true), '') AS response_headers, nullif(current_setting('response.status', true), '') AS response_status, '' AS response_inserted FROM ( SELECT * FROM pgrst_source ) _postgrest_t

-- expect: pooled  (PostgREST insert)
WITH pgrst_source AS (INSERT INTO "public"."todos"("task", "user_id") SELECT "pgrst_body"."task", "pgrst_body"."user_id" FROM (SELECT $1 AS json_data) pgrst_payload, LATERAL (SELECT "task", "user_id" FROM json_to_record(pgrst_payload.json_data) AS _("task" text, "user_id" uuid) ) pgrst_body  RETURNING "public"."todos".*) SELECT '' AS total_result_set, pg_catalog.count(_postgrest_t) AS page_total, array[]::text[] AS header, coalesce(json_agg(_postgrest_t), '[]') AS body FROM (SELECT * FROM pgrst_source) _postgrest_t

-- expect: pooled  (RLS policy body evaluated in app queries)
select * from public.profiles where id = auth.uid()

-- expect: pooled
SELECT nullif(current_setting('request.jwt.claim.sub', true), '')::uuid

-- expect: pooled  (role switch for one transaction)
SET LOCAL ROLE authenticated

-- expect: pooled
set local "request.jwt.claims" to '{"sub":"8a1f…","role":"authenticated"}'

-- expect: pooled  (realtime)
SELECT wal->>'type' AS type, wal FROM realtime.list_changes($1, $2, $3, $4)

-- expect: pooled  (storage)
select * from storage.search(prefix => $1, bucketname => $2, limits => $3, levels => $4, offsets => $5)

-- expect: pooled  (edge function via supabase-js RPC)
select "public"."increment_counter"("row_id" := $1)

-- expect: pooled  (job queue with pg_notify: NOTIFY is delivered at commit)
SELECT pg_notify('jobs', json_build_object('id', $1)::text)

-- expect: pooled  (transaction-scoped JWT claims for a server-side job)
SELECT set_config('request.jwt.claims', '{"role":"service_role"}', 't'::boolean)

-- expect: direct session_set  (is_local is a parameter: not knowable here, treated as session)
SELECT set_config('request.jwt.claims', $1, $2)

-- expect: direct session_set  (supabase db push)
SET lock_timeout = '4s'

-- expect: direct ddl
CREATE POLICY "Users can view own profile" ON public.profiles FOR SELECT USING (auth.uid() = id);

-- expect: direct ddl
ALTER TABLE public.profiles ENABLE ROW LEVEL SECURITY;

-- expect: direct ddl
GRANT USAGE ON SCHEMA public TO anon, authenticated;

-- expect: direct ddl
create or replace function public.handle_new_user()
returns trigger
language plpgsql
security definer set search_path = ''
as $$
begin
  insert into public.profiles (id, full_name) values (new.id, new.raw_user_meta_data->>'full_name');
  return new;
end;
$$;

-- expect: direct ddl
create trigger on_auth_user_created after insert on auth.users for each row execute procedure public.handle_new_user();

-- expect: direct ddl  (conditional DDL in a DO block)
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_type WHERE typname = 'mood') THEN
    CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
  END IF;
END
$$;

-- expect: pooled  (migration history row)
INSERT INTO supabase_migrations.schema_migrations(version, name, statements) VALUES($1, $2, $3)

-- expect: direct catalog  (supabase studio table list)
SELECT c.oid :: int8 AS id, nc.nspname AS schema, c.relname AS name, c.relrowsecurity AS rls_enabled, obj_description(c.oid) AS comment FROM pg_namespace nc JOIN pg_class c ON nc.oid = c.relnamespace WHERE c.relkind IN ('r', 'p') AND NOT pg_is_other_temp_schema(nc.oid) AND (pg_has_role(c.relowner, 'USAGE') OR has_table_privilege(c.oid, 'SELECT, INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER'))

-- expect: direct catalog  (studio: columns from information_schema)
SELECT table_name, column_name, data_type FROM information_schema.columns WHERE table_schema = 'public' ORDER BY table_name, ordinal_position
