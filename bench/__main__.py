"""`python -m bench` runs the metabench command line."""

from bench.cli import main

raise SystemExit(main())
