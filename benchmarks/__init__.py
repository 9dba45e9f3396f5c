"""ckptstore benchmark suite.

Run everything (local disk and /dev/shm, W1-W3, all contenders, 5 alternating rounds)::

    .venv/bin/python -m benchmarks.run

Quick smoke run (small sizes, ~1-2 minutes)::

    .venv/bin/python -m benchmarks.run --quick

See ``benchmarks/README.md`` and ``python -m benchmarks.run --help`` for the options. Results go to
``benchmarks/results/<name>.{md,json,png}``.
"""
