"""tdkd's version, written into manifests and run.json."""

__version__ = "0.1.0"
