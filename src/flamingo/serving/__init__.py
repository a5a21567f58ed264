"""Serving: the engine (continuous batching over explicit Flamingo state, a shared prefix cache)
and its metrics; the HTTP server (`flamingo serve`) is built on them."""
