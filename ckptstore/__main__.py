"""``python -m ckptstore``: the ckptstore command line (see :mod:`ckptstore.cli`)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
