from tests.search.conftest import corpus  # noqa: F401  (the same small corpus, ingested once per module)
