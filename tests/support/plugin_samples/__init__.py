"""Small plugins with one bug each, for the boundary tests (tests/e2e/test_boundaries.py). Each is
loaded only where a test names it: as a config.toml `plugins = [...]` module or through the
entry point of a test distribution."""
