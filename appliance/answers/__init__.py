"""Cited answers from the local chat model over a tenant's documents (retrieval-augmented generation)."""
