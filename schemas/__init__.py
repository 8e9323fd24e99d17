"""Contracts shared by producers and workers: events, topics, tables, API bodies."""
