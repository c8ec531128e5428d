"""``python -m jaxrlhf.cli``: the same command line as ``jaxrlhf``."""

from jaxrlhf.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
