"""`python -m daemon.cli`: the lorafarm command, as the tests and benches start it."""

import os

from daemon.cli.main import main

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download weights at run time
raise SystemExit(main())
