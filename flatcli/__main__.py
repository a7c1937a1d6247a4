from flatcli.cli.app import main

main()
