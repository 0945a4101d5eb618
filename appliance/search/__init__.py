"""Retrieval: vector, full-text and hybrid (reciprocal-rank fusion) search over a tenant's chunks."""
