"""Pytest setup: keep `python -m lcc` out of doctest collection."""

collect_ignore = ["lcc/__main__.py"]
