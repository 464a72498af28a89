"""`python -m zoo.cli` (e.g. under torchrun: `torchrun --nproc-per-node 8 -m zoo.cli build ...`)."""

from zoo.cli import main

raise SystemExit(main())
