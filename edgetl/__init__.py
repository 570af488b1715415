"""edgetl: from a small image dataset to a verified model running on an edge device."""

__version__ = "0.1.0"
