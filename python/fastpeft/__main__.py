"""`python -m fastpeft ...` is the `fastpeft` command."""
import sys

from .cli import main

sys.exit(main())
