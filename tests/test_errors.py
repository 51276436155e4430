"""The one exception tree and its one HTTP status table: every error syncbit defines lives
in `syncbit.errors`, a status means the same error for every server and client, and a
server's answer cannot make a client raise an error of another status."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from syncbit import errors
from syncbit.errors import (
    HTTP_STATUS,
    DaemonUnreachableError,
    DatasetExistsError,
    LengthRequiredError,
    NotFoundError,
    NotLeaderError,
    PayloadTooLargeError,
    SchedulerError,
    SourceChangedError,
    SourceError,
    StateUnavailableError,
    SyncbitError,
    UnauthorizedError,
    UserError,
    error_class,
    error_doc,
    http_status,
)

PACKAGE = Path(errors.__file__).parent

# Exception classes allowed outside errors.py, each with its reason. Nothing else may be.
ELSEWHERE = {
    # The FUSE reply: an errno for the kernel, made of these errors at the fs boundary.
    ("fs/wire.py", "FUSEError"),
    # The scheduler package is being rebuilt; it adopts errors.DatasetExistsError and the
    # status table (MethodNotAllowedError, BodyError) in place of these.
    ("scheduler/state.py", "DatasetExistsError"),
    ("scheduler/server.py", "_HTTPError"),
}


def _tree() -> list[type[SyncbitError]]:
    found, todo = [], [SyncbitError]
    while todo:
        cls = todo.pop()
        if cls.__module__ == errors.__name__:
            found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def _is_exception(node: ast.ClassDef) -> bool:
    names = [b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases]
    return any(n.endswith(("Error", "Exception")) or n == "Exception" for n in names)


def test_no_exception_class_is_defined_outside_errors_py() -> None:
    found = set()
    for path in PACKAGE.rglob("*.py"):
        if path.name == "errors.py" and path.parent == PACKAGE:
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and _is_exception(node):
                found.add((str(path.relative_to(PACKAGE)), node.name))
    assert found <= ELSEWHERE, sorted(found - ELSEWHERE)


def test_the_docstring_draws_every_class_of_the_tree() -> None:
    doc = errors.__doc__ or ""
    missing = [cls.__name__ for cls in _tree() if f" {cls.__name__} " not in doc]
    assert not missing


def test_every_error_is_built_from_its_message_alone() -> None:
    for cls in _tree():
        assert str(cls("why")) == "why", cls


def test_status_follows_the_nearest_row_of_the_table() -> None:
    assert http_status(DatasetExistsError("taken")) == 409  # its own row before UserError's
    assert http_status(SourceChangedError("gone")) == 502
    assert http_status(StateUnavailableError("no quorum")) == 503
    assert http_status(NotLeaderError("not me")) == 503  # what the scheduler answers today
    assert http_status(PayloadTooLargeError("big")) == 413 == PayloadTooLargeError("x").status
    assert http_status(LengthRequiredError("chunked")) == 411
    assert http_status(SyncbitError("unmapped")) == 500
    assert http_status(RuntimeError("a bug")) == 500
    assert error_doc(NotFoundError("no dataset x")) == {
        "error": "no dataset x",
        "kind": "NotFoundError",
    }
    assert error_doc(KeyError("secret"), "internal error") == {
        "error": "internal error",
        "kind": "KeyError",
    }


@pytest.mark.parametrize("cls", [c for c in _tree() if http_status(c) != 500])
def test_a_client_raises_what_the_server_answered(cls: type[SyncbitError]) -> None:
    doc = error_doc(cls("why"))
    assert error_class(http_status(cls), doc["kind"]) is cls


def test_a_status_alone_names_its_most_general_error() -> None:
    assert error_class(400) is UserError
    assert error_class(401, None) is UnauthorizedError
    assert error_class(404, "SomethingNew") is NotFoundError
    assert error_class(502) is SourceError
    # Two unrelated errors answer 503, and a 500 is a bug: the client decides.
    assert error_class(503) is None and error_class(500) is None
    assert error_class(503, "SchedulerError") is SchedulerError
    assert error_class(503, "DaemonUnreachableError") is DaemonUnreachableError


def test_a_kind_never_changes_the_status_a_client_acts_on() -> None:
    # A 400 that claims to be a 401 stays a plain user error; a 404 is never a 409.
    assert error_class(400, "UnauthorizedError") is UserError
    assert error_class(404, "DatasetExistsError") is NotFoundError
    # Names that are not classes of the tree are not looked up anywhere else.
    assert error_class(400, "ValueError") is UserError
    assert error_class(500, "SystemExit") is None
    assert error_class(400, ["UserError"]) is UserError


def test_every_row_is_a_class_of_the_tree() -> None:
    assert set(HTTP_STATUS) <= set(_tree())
