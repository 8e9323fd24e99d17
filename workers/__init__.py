"""What consumes the topics: the admission and enricher stream processors, inference
workers, the recorder, and the services off the request path (memory, webhooks,
batches, usage, reconciler); each declares its service beside its handler."""
