"""Full text ranked by BM25, through a function the GIN index can serve under row-level security.

Why a function: under RLS the planner may not evaluate a non-leakproof operator before the policy's
qual, and `@@` (ts_match_vq) is not leakproof, so for the application role a full-text query filtered
every chunk of the tenant instead of using the GIN index (measured: 0.3 s at 100k chunks, 2.5 s at 1M).
`app_fulltext_ranked` runs as the owner (whose permissive `owner_all` policy makes the RLS qual
constant true), restricts rows to `app_current_tenant()` itself exactly as the policy does (no tenant
set: no rows) and returns chunk ids and scores only; the rows are then read through RLS.

Why BM25: `ts_rank` has no notion of how rare a word is, which is most of what ranks an OR-ed
natural-language query (SciFact nDCG@10: ts_rank 0.587, BM25 0.68). BM25 needs each lexeme's document
frequency and the tenant's average chunk length: `fulltext_lexemes` and `fulltext_stats`, per tenant,
kept exact by statement-level triggers on `chunks` (insert and delete; chunk text never changes in
place: a new version deletes and inserts). Each trigger updates the tenant's stats row first, so
writers of one tenant serialise from their chunk statement to commit and take lexeme locks one at a
time: no deadlocks. Only the owner writes them (the trigger functions run as the owner); the
application role may read its own tenant's rows.

Candidates: the query's lexemes rarest first until their summed document frequency reaches
`p_fraction` of the tenant's chunks, within [`p_min_candidates`, `p_max_candidates`] (the rarest
always, and the one that crosses); chunks holding any of them come from the GIN index, and every
query lexeme counts in their score. A chunk holding only very common query words is not a
candidate: the price of a bounded cost (docs/retrieval.md has the measurements).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26
"""

from __future__ import annotations

from alembic import op

from appliance.db.rls import app_role_ident, enable_tenant_rls

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

SIGNATURE = (
    "app_fulltext_ranked(text, integer, real, integer, integer, uuid[], text[], jsonb, text[],"
    " timestamptz, timestamptz)"
)


def upgrade() -> None:
    app = app_role_ident()
    op.execute(
        """
        CREATE TABLE fulltext_stats (
            tenant_id uuid PRIMARY KEY REFERENCES tenants (id) ON DELETE CASCADE,
            n_chunks bigint NOT NULL,
            sum_len bigint NOT NULL  -- sum of length(tsv): distinct lexemes per chunk
        )
        """
    )
    op.execute(
        """
        CREATE TABLE fulltext_lexemes (
            tenant_id uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
            lexeme text NOT NULL,
            df integer NOT NULL,  -- the tenant's chunks whose tsv holds the lexeme
            PRIMARY KEY (tenant_id, lexeme)
        ) WITH (fillfactor = 70)
        """
    )
    for table in ("fulltext_stats", "fulltext_lexemes"):
        for statement in enable_tenant_rls(table):
            op.execute(statement)
        op.execute(f"GRANT SELECT ON {table} TO {app}")  # its own tenant's rows, read-only
    op.execute(
        """
        CREATE FUNCTION app_fulltext_after_insert() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp
        AS $$
        BEGIN
          INSERT INTO fulltext_stats AS s (tenant_id, n_chunks, sum_len)
          SELECT tenant_id, count(*), sum(length(tsv)) FROM new_rows GROUP BY tenant_id ORDER BY tenant_id
          ON CONFLICT (tenant_id) DO UPDATE
            SET n_chunks = s.n_chunks + EXCLUDED.n_chunks, sum_len = s.sum_len + EXCLUDED.sum_len;
          INSERT INTO fulltext_lexemes AS l (tenant_id, lexeme, df)
          SELECT n.tenant_id, u.lexeme, count(*)
          FROM new_rows n, unnest(tsvector_to_array(n.tsv)) AS u(lexeme)
          GROUP BY 1, 2 ORDER BY 1, 2
          ON CONFLICT (tenant_id, lexeme) DO UPDATE SET df = l.df + EXCLUDED.df;
          RETURN NULL;
        END
        $$
        """
    )
    op.execute(
        """
        CREATE FUNCTION app_fulltext_after_delete() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp
        AS $$
        BEGIN
          UPDATE fulltext_stats s SET n_chunks = s.n_chunks - o.n, sum_len = s.sum_len - o.len
          FROM (SELECT tenant_id, count(*) AS n, sum(length(tsv)) AS len FROM old_rows GROUP BY 1) o
          WHERE s.tenant_id = o.tenant_id;
          UPDATE fulltext_lexemes l SET df = l.df - g.n
          FROM (SELECT r.tenant_id, u.lexeme, count(*) AS n
                FROM old_rows r, unnest(tsvector_to_array(r.tsv)) AS u(lexeme) GROUP BY 1, 2) g
          WHERE l.tenant_id = g.tenant_id AND l.lexeme = g.lexeme;
          DELETE FROM fulltext_lexemes l
          WHERE l.df <= 0 AND l.tenant_id IN (SELECT DISTINCT tenant_id FROM old_rows);
          RETURN NULL;
        END
        $$
        """
    )
    op.execute(
        "CREATE TRIGGER chunks_fulltext_insert AFTER INSERT ON chunks REFERENCING NEW TABLE AS new_rows"
        " FOR EACH STATEMENT EXECUTE FUNCTION app_fulltext_after_insert()"
    )
    op.execute(
        "CREATE TRIGGER chunks_fulltext_delete AFTER DELETE ON chunks REFERENCING OLD TABLE AS old_rows"
        " FOR EACH STATEMENT EXECUTE FUNCTION app_fulltext_after_delete()"
    )
    # Chunks indexed before this migration.
    op.execute(
        "INSERT INTO fulltext_stats (tenant_id, n_chunks, sum_len)"
        " SELECT tenant_id, count(*), sum(length(tsv)) FROM chunks GROUP BY tenant_id"
    )
    op.execute(
        "INSERT INTO fulltext_lexemes (tenant_id, lexeme, df)"
        " SELECT c.tenant_id, u.lexeme, count(*) FROM chunks c, unnest(tsvector_to_array(c.tsv)) AS u(lexeme)"
        " GROUP BY 1, 2"
    )
    # PL/pgSQL with EXECUTE: the statement holds only the filters given and is planned with the actual
    # values (a SQL function's generic plan, with `$n IS NULL OR ...` for every filter, estimated one
    # document and walked every document of the tenant: 0.8 s at 100k chunks).
    op.execute(
        r"""
        CREATE FUNCTION app_fulltext_ranked(
            p_query text, p_limit integer, p_fraction real, p_min_candidates integer,
            p_max_candidates integer,
            p_document_ids uuid[], p_tags text[],
            p_metadata jsonb, p_content_types text[], p_created_after timestamptz,
            p_created_before timestamptz
        ) RETURNS TABLE (id bigint, rank real)
        LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = public, pg_temp
        AS $$
        DECLARE
          tenant uuid := app_current_tenant();
          n bigint;
          total bigint;
          lexemes text[];
          idfs float8[];
          candidates text;
          budget float8;
          sql text;
        BEGIN
          IF tenant IS NULL THEN
            RETURN;  -- no tenant set: no rows, as the policy
          END IF;
          SELECT s.n_chunks, s.sum_len INTO n, total FROM fulltext_stats s WHERE s.tenant_id = tenant;
          IF coalesce(n, 0) <= 0 THEN
            RETURN;
          END IF;
          budget := greatest(p_min_candidates, least(p_fraction * n, p_max_candidates));
          -- Each lexeme quoted for tsquery input (quotes doubled, backslashes escaped), OR-ed.
          SELECT array_agg(w.lexeme), array_agg(w.idf),
                 string_agg('''' || replace(replace(w.lexeme, '\', '\\'), '''', '''''') || '''', ' | ')
                   FILTER (WHERE w.cum_df - w.df < budget)
          INTO lexemes, idfs, candidates
          FROM (
            SELECT u.lexeme, coalesce(l.df, 0) AS df,
                   sum(coalesce(l.df, 0)) OVER (ORDER BY coalesce(l.df, 0), u.lexeme) AS cum_df,
                   ln(1 + (n - coalesce(l.df, 0) + 0.5)::float8 / (coalesce(l.df, 0) + 0.5)) AS idf
            FROM unnest(to_tsvector('english', p_query)) AS u
            LEFT JOIN fulltext_lexemes l ON l.tenant_id = tenant AND l.lexeme = u.lexeme
          ) w;
          IF candidates IS NULL THEN
            RETURN;  -- nothing searchable in the query
          END IF;
          -- BM25, k1 = 1.2, b = 0.75; a chunk's length is its number of distinct lexemes.
          sql := 'SELECT c.id, (SELECT sum(q.idf * coalesce(cardinality(t.positions), 1) * 2.2'
            ' / (coalesce(cardinality(t.positions), 1) + 1.2 * (0.25 + 0.75 * length(c.tsv) / $5)))'
            ' FROM unnest(ts_filter(setweight(c.tsv, ''A'', $3), ''{a}'')) AS t'
            ' JOIN unnest($3, $4) AS q(lexeme, idf) ON q.lexeme = t.lexeme)::real AS rank'
            ' FROM chunks c JOIN documents d ON d.id = c.document_id'
            ' WHERE c.tenant_id = $2 AND d.tenant_id = $2 AND c.tsv @@ $1 AND d.status = ''active''';
          IF p_document_ids IS NOT NULL THEN sql := sql || ' AND c.document_id = ANY ($7)'; END IF;
          IF p_tags IS NOT NULL THEN sql := sql || ' AND d.tags @> $8'; END IF;
          IF p_metadata IS NOT NULL THEN sql := sql || ' AND d.metadata @> $9'; END IF;
          IF p_content_types IS NOT NULL THEN
            sql := sql || ' AND EXISTS (SELECT 1 FROM document_versions v WHERE v.id = c.version_id'
                       || ' AND v.tenant_id = $2 AND v.content_type = ANY ($10))';
          END IF;
          IF p_created_after IS NOT NULL THEN sql := sql || ' AND d.created_at >= $11'; END IF;
          IF p_created_before IS NOT NULL THEN sql := sql || ' AND d.created_at <= $12'; END IF;
          sql := sql || ' ORDER BY rank DESC, c.id LIMIT $6';
          RETURN QUERY EXECUTE sql USING to_tsquery('simple', candidates), tenant, lexemes, idfs,
            total::float8 / n, p_limit, p_document_ids, p_tags, p_metadata, p_content_types,
            p_created_after, p_created_before;
        END
        $$
        """
    )
    op.execute(f"REVOKE ALL ON FUNCTION {SIGNATURE} FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION {SIGNATURE} TO {app}")


def downgrade() -> None:
    op.execute(f"DROP FUNCTION IF EXISTS {SIGNATURE}")
    op.execute("DROP TRIGGER IF EXISTS chunks_fulltext_delete ON chunks")
    op.execute("DROP TRIGGER IF EXISTS chunks_fulltext_insert ON chunks")
    op.execute("DROP FUNCTION IF EXISTS app_fulltext_after_delete()")
    op.execute("DROP FUNCTION IF EXISTS app_fulltext_after_insert()")
    op.execute("DROP TABLE IF EXISTS fulltext_lexemes")
    op.execute("DROP TABLE IF EXISTS fulltext_stats")
