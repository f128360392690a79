"""Hydra: `OverridesParser`, the parser of command-line overrides, to explain a refused command line."""

TESTED = "1.3"


def parse_overrides(lines: list[str]) -> list:
    """Hydra's `Override` objects (`key_or_group`, `input_line`, `is_add()`, ...) for `key=value` lines."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(lines)
