"""Allow ``python -m adpredict``."""

from adpredict.cli import main

raise SystemExit(main())
