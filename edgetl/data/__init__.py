"""Stage 1: the dataset: class folders and splits, image decoding, generated demo data."""
