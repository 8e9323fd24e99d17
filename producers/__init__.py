"""Producers: everything that puts work onto topics (HTTP API, Python client)."""
