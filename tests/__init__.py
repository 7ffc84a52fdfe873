"""lorafarm's tests: a package, so that pytest imports every test module by its full name
(`tests.unit.test_store`) with the repository root on sys.path and one `tests.conftest`."""
