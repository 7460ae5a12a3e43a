"""The `terarec` command line."""
def main() -> None:
    raise SystemExit("terarec: not built yet")
