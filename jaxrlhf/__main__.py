"""python -m jaxrlhf → the jaxrlhf command line."""

from jaxrlhf.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
