"""The one place where the command line turns failures into an `error:` line on stderr and
an exit code: 2 for a user's mistake, 1 for a system failure, 130 for Ctrl-C. Never
prints a traceback (an unexpected error is a bug: its traceback goes to the debug log).
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import typer

from syncbit.errors import SyncbitError, UserError

P = ParamSpec("P")
T = TypeVar("T")


def guarded(fn: Callable[P, T]) -> Callable[P, T]:
    """Turn syncbit errors into `error: message` on stderr and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            typer.echo(f"error: {shown(exc)}", err=True)
            raise typer.Exit(2) from None
        except SyncbitError as exc:
            typer.echo(f"error: {shown(exc)}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            raise typer.Exit(130) from None

    return wrapper


def shown(exc: BaseException) -> str:
    """An error's message on one line, credentials masked (a URL the user typed with a
    password in it is not echoed back into a terminal log)."""
    from syncbit.redact import scrub

    return " ".join(scrub(str(exc)).split()) or type(exc).__name__


def run(app: typer.Typer) -> None:
    """Run `app` and exit: every failure is one `error:` line and an exit code, usage
    mistakes (a missing argument, an unknown flag) included: exit 2, never a traceback."""
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as exc:  # click's usage errors (typer vendors click)
        format_message = getattr(exc, "format_message", None)
        message = " ".join(str(format_message() if format_message else exc).split())
        ctx = getattr(exc, "ctx", None)
        where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        if message:  # none: the help was shown (a group called without a command)
            typer.echo(f"error: {message}{where}", err=True)
        sys.exit(int(getattr(exc, "exit_code", 2)))
    except (typer.Abort, KeyboardInterrupt):
        sys.exit(130)
    except Exception as exc:  # a bug: one line here, the traceback only in a debug log
        logging.getLogger("syncbit").debug("unexpected error", exc_info=True)
        typer.echo(
            f"error: unexpected {type(exc).__name__} (a bug in syncbit): {shown(exc)}", err=True
        )
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
