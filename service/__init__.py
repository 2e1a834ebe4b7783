"""The graphprune service: an HTTP jobs API in front of `graphprune.prune`, run in isolated workers.

`service.app.create_app()` builds the ASGI app; `graphprune serve` runs it with uvicorn. Nothing
here prunes: workers call the library, the API validates, stores and streams. This package
imports nothing on its own so a worker process loads only what it needs.
"""
