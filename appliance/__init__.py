"""The document-AI appliance: one package, run as API, workers and CLI."""

__version__ = "0.1.0"
