"""`python -m distillab ...` (also what `torchrun -m distillab train ...` runs)."""

from distillab.cli import main

raise SystemExit(main())
