"""Consumers: the enricher stream processor, inference workers, the recorder."""
