"""visrec: visually similar products from product photos, filtered by metadata."""

__version__ = "0.1.0"
