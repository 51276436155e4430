"""The `syncbit` command line: commands grouped by concern, the client of a node's local
control API, and one place (`exits`) where failures become `error:` lines and exit codes.

    root           the app and `main` (the console entry point; `python -m syncbit.cli`)
    exits          `guarded` and `run`: messages and exit codes, never a traceback
    common         options shared by commands, the scheduler call, names and pairs
    services       scheduler, daemon           datasets   dataset add|ls|rm
    transfer       pull, prefetch, wait        nodes      node label|trust|ls
    cache          cache ls|evict|verify|gc    volumes    volume publish|unpublish|ls
    security       token create, tls init      status     status
    daemon_client  the daemon's local API over http.client (stdlib only)
    progress       following a pull or wait on the daemon (stdlib only)

Start-up is part of the contract: `syncbit wait` runs in every initContainer, so nothing
here imports trio, httpx or pydantic at module level; commands import what they use.
Numbers and tables are formatted by `syncbit.humanize`, nowhere else.
"""

from syncbit.cli.root import app, main

__all__ = ["app", "main"]
