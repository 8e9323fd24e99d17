"""The HTTP API (FastAPI): submit jobs, read their status and results."""
