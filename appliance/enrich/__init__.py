"""Enrichment of ingested versions: an LLM summary (`summarize` jobs) and per-tenant labels (`classify`)."""
