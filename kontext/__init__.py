"""Kontext: CLI, settings, shared connections and the embedded dev runtime."""
