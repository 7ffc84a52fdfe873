"""`python -m daemon.cli` runs the lorafarm command."""

from daemon.cli.main import main

raise SystemExit(main())
