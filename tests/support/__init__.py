"""Real servers for the tests: redis-server and uvicorn in subprocesses on
free loopback ports."""
