"""terarec.platform.data."""
