"""diffusers: `_use_default_values`, the list of config keys a live object took as defaults."""

TESTED = "0.42"


def explicit_config(config) -> dict:
    """A config in which every value counts as set. A live scheduler remembers which of its values were defaults
    (`_use_default_values`) and `from_config` replaces those with the new class's defaults: a reloaded pipeline's
    config has no such list, and SD 1.5's lists `prediction_type`, so a v-prediction override would silently
    turn back into epsilon."""
    return {key: value for key, value in dict(config).items() if key != "_use_default_values"}
