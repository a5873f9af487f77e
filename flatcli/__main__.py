"""``python -m flatcli``: the command line."""

from flatcli.cli import main

main()
