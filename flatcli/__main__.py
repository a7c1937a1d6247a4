"""``python -m flatcli``: the same as the ``flatcli`` console script."""

from flatcli.cli.app import main

if __name__ == "__main__":
    main()
