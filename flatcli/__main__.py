from flatcli.cli import main

main()
