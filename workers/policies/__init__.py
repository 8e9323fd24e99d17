"""Gateway policy steps (limits, routing, cache, review...) and the one place they are composed."""
