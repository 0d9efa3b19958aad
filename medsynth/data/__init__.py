"""Data: image reading, MONAI transform chains, datasets, and the built-in phantom generator."""
