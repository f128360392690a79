"""The private APIs of other libraries that diffusion_lab relies on, each in one place.

One module per library. Each states the versions it was checked against (`TESTED`, matched by the upper pin
in `pyproject.toml`) and has a test in `tests/test_compat.py` that fails when the behaviour relied on changes.
"""

from importlib.metadata import version


def require_below(distribution: str, ceiling: tuple[int, ...], what: str) -> None:
    """Refuse, naming `what`, a version of `distribution` at or above `ceiling` (the pin in pyproject.toml can be
    bypassed by `pip install --no-deps`)."""
    installed = tuple(
        int(part) for part in version(distribution).split(".")[: len(ceiling)] if part.isdigit()
    )
    if installed >= ceiling:
        raise RuntimeError(
            f"{distribution} {version(distribution)} is newer than diffusion_lab was checked against "
            f"(< {'.'.join(map(str, ceiling))}) for {what}; install a version below it"
        )
