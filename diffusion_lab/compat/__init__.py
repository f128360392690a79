"""The private APIs of other libraries that diffusion_lab relies on, each in one place.

One module per library. Each names the version it was checked against (`TESTED`), under the upper pin of that
library in `pyproject.toml`, and `tests/test_compat.py` fails when the behaviour relied on changes.
"""
