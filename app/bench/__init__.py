"""Tools that measure the model, the sampler and a running server from outside (`pixelcnn bench VERB`, the
verbs listed in app/cli.py's BENCH_VERBS), and the nginx + replicas harness they and the tests drive
(gateway.py). Each benchmark prints a table, or JSON with --json. Nothing in app/ imports this package."""
