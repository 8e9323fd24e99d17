"""Kontext's core, which producers and workers build on (settings, connections,
metrics, listen, ssrf, migrate); the Postgres store (``kontext.store``); and what sits
above them: the runtime (``kontext.app``), the CLI, benchmarks and chaos."""
