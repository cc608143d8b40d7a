"""`python -m clicooper ...`: the same as the `clicooper` command (used by `launch local`)."""

from clicooper.cli import main

main()
