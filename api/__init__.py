"""terarec.api."""
