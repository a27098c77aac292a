"""`python -m hivenet.cli`: the same as the `hivenet` command (used by the demo and tests)."""

from hivenet.cli.main import main

main()
