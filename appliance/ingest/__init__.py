"""Ingestion: extract → chunk → embed → index, run by the workers."""
