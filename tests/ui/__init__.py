"""The status page: in-process HTTP and a real headless browser."""
