"""terarec.store."""
