"""The verdicts API: a thin FastAPI transport over the verdict board, the analyst SQL check and the
candidate registry. ``app`` (routes), ``process`` (the standalone API), ``board``, ``analyst_sql``,
``query_output``, ``candidates`` (/v1/candidates)."""
