"""datasets: `Dataset._fingerprint`, the hash of a dataset's content and transforms that its cache files use."""

TESTED = "5.2"


def dataset_fingerprint(dataset) -> str:
    """What names this dataset's content: equal for the same files loaded twice, different after a change."""
    return str(dataset._fingerprint)
