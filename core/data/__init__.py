"""terarec.core.data."""
