"""`python -m lithify ...` is the `lithify` command (how `lithify cluster` starts processes)."""

from lithify.cli.main import main

if __name__ == "__main__":
    main()
