"""terarec.actors."""
