"""Load-test a running adpredict server: the same as ``adpredict loadtest`` (see its --help).

    .venv/bin/python benchmarks/loadtest.py --target 127.0.0.1:50051 --rate 500 --duration 10 \
        --candidates 32 --out benchmarks/results/loadtest.json --plot benchmarks/results/loadtest.png

The logic lives in ``adpredict.loadtest`` (importable, tested in tests/test_loadtest.py).
"""

from __future__ import annotations

import sys

from adpredict.loadtest import main

if __name__ == "__main__":
    sys.exit(main())
