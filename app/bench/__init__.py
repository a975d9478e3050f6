"""Benchmarks: `pixelcnn bench model|sampling|http`. Each prints a table, or JSON with --json."""
