"""`python -m syncbit.cli`: the same command as the `syncbit` console script."""

from syncbit.cli.root import main

main()
