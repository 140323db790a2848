"""End to end, every part a real process: servers (uvicorn and the others), the example's own
worker command, the client's command line, a browser, each worker pool, Redis as production
runs it (Sentinel, TLS, ACL users)."""
