"""Helpers the tests import or run, and the soak scripts (`python -m tests.support.NAME`)."""
