"""fastpeft benchmarks: `python -m bench.run --help`."""
