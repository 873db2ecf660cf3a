"""`python -m lantern …` is the `lantern` command."""

from lantern.agent.cli import main

raise SystemExit(main())
