"""Source options: every scheme's keys and values checked the same way, booleans that are
booleans, secrets that never reach a manifest or a message (`sources.options`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from syncbit.config import DaemonConfig, SchedulerConfig, build
from syncbit.errors import ConfigError, InvalidSourceError
from syncbit.redact import scrub
from syncbit.sources.http import HttpSource
from syncbit.sources.options import (
    SCHEMES,
    parse_bool,
    public_options,
    public_source,
    validate_options,
)


@pytest.mark.parametrize(
    ("uri", "key"),
    [
        ("hf://org/model", "includ"),
        ("https://origin/x/", "verfiy"),
        ("s3://bucket/p/", "endpoint"),
        ("file:///srv/x", "headers"),
        ("http://origin/", "Headers"),
    ],
)
def test_unknown_keys_are_named_with_the_valid_ones(uri: str, key: str) -> None:
    with pytest.raises(InvalidSourceError) as info:
        validate_options(uri, {key: "x"})
    message = str(info.value)
    assert repr(key) in message
    scheme = uri.split("://")[0]
    assert "valid options: " + ", ".join(sorted(SCHEMES[scheme])) in message


@pytest.mark.parametrize("text", ["false", "0", "no", "off", "False", " OFF ", False, 0])
def test_false_is_false(text: Any) -> None:
    assert parse_bool(text) is False


@pytest.mark.parametrize("text", ["true", "1", "yes", "on", "TRUE", True, 1])
def test_true_is_true(text: Any) -> None:
    assert parse_bool(text) is True


@pytest.mark.parametrize("text", ["", "maybe", "2", "nope", "y", None, 1.5, [], {}])
def test_anything_else_is_not_a_boolean(text: Any) -> None:
    with pytest.raises(ValueError):
        parse_bool(text)
    with pytest.raises(InvalidSourceError, match=r"invalid option verify=.*expected a boolean"):
        validate_options("https://origin/", {"verify": text})


def test_verify_takes_the_boolean_spellings() -> None:
    # What verify does on the wire: test_http_source's https origin test.
    for given, expected in (("false", False), ("off", False), ("true", True), (None, True)):
        source = HttpSource("https://origin/x", {} if given is None else {"verify": given})
        try:
            assert source.verify is expected
        finally:
            source.close()


@pytest.mark.parametrize(
    ("uri", "options", "why"),
    [
        ("hf://org/m", {"token": ""}, "empty"),
        ("hf://org/m", {"token": "   "}, "empty"),
        ("hf://org/m", {"timeout": "soon"}, "number"),
        ("hf://org/m", {"timeout": "nan"}, "number"),
        ("hf://org/m", {"timeout": "-1"}, "number"),
        ("hf://org/m", {"endpoint": "ftp://mirror"}, "http"),
        ("hf://org/m", {"endpoint": "https://u:p@mirror"}, "credentials"),
        ("hf://org/m", {"include": 3}, "globs"),
        ("https://o/", {"concurrency": "1.5"}, "number"),
        ("https://o/", {"concurrency": "0"}, "number"),
        ("https://o/", {"follow_redirects": "sometimes"}, "none, same-host, any"),
        ("https://o/", {"headers": "Authorization: x"}, "mapping"),
        ("https://o/", {"headers": {"Range": "bytes=0-"}}, "set by syncbit"),
        ("https://o/", {"headers": {"X Bad": "v"}}, "not a valid header name"),
        ("https://o/", {"headers": {"X-Key": "a\r\nHost: evil"}}, "one line"),
        ("s3://b/p", {"addressing_style": "diagonal"}, "auto, path, virtual"),
        ("s3://b/p", {"max_attempts": "0"}, "number"),
        ("s3://b/p", {"endpoint_url": "minio:9000"}, "http"),
        ("file:///srv", {"max_open_files": "lots"}, "number"),
    ],
)
def test_bad_values_name_the_key(uri: str, options: dict[str, Any], why: str) -> None:
    (key,) = options
    with pytest.raises(InvalidSourceError, match=f"invalid option {key}=") as info:
        validate_options(uri, options)
    assert why in str(info.value)


def test_secret_values_are_never_repeated_in_errors() -> None:
    with pytest.raises(InvalidSourceError) as info:
        validate_options("https://o/", {"headers": {"X-Key": "sekrit-value\n"}})
    assert "sekrit" not in str(info.value) and "***" in str(info.value)


def test_values_are_parsed() -> None:
    got = validate_options(
        "https://o/",
        {"verify": "no", "timeout": "2.5", "concurrency": "4", "include": "a,b", "exclude": []},
    )
    assert got == {
        "verify": False,
        "timeout": 2.5,
        "concurrency": 4,
        "include": ["a", "b"],
        "exclude": [],
    }


def test_public_options_drop_every_secret() -> None:
    options = {"headers": {"Authorization": "Bearer x"}, "timeout": 3.0, "include": ["*"]}
    assert public_options("https://o/", options) == {"timeout": 3.0, "include": ["*"]}
    assert public_options("hf://o/m", {"token": "hf_x", "revision": "v1"}) == {"revision": "v1"}
    # operator-only options are each node's own decision, never a manifest's
    assert public_options("https://o/", {"allow_link_local": True, "verify": True}) == {
        "verify": True
    }
    # a scheme without a table: secret-looking keys go all the same
    assert public_options("memtest://x", {"api_token": "t", "n": 1}) == {"n": 1}


def test_public_source_drops_credentials_and_refuses_signed_urls() -> None:
    assert public_source("http://user:pw@origin:8080/d/") == ("http://origin:8080/d/", True)
    assert public_source("https://origin/d/?download=1") == ("https://origin/d/?download=1", False)
    for signed in (
        "https://bucket.s3.amazonaws.com/k?X-Amz-Signature=abcdef&X-Amz-Credential=AKIA",
        "https://cdn/k?Expires=1&Signature=abcdef&Key-Pair-Id=K",
        "https://acct.blob.core.windows.net/c/k?sv=1&sig=abcdef",
        "https://api/x?access_token=abcdef",
    ):
        with pytest.raises(InvalidSourceError, match="credentials in its query string") as info:
            public_source(signed)
        assert "abcdef" not in str(info.value)


def test_config_source_options_are_checked_at_start_up(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text('source_options: {"hf://": {includ: "*.json"}}\n')
    with pytest.raises(ConfigError, match=r"source_options.*includ.*valid options") as info:
        build(DaemonConfig, config, {})
    assert "include" in str(info.value)
    config.write_text('source_options: {"models/": {region: x}}\n')
    with pytest.raises(ConfigError, match="not a URI prefix"):
        build(SchedulerConfig, config, {})
    config.write_text('source_options: {"https://o/": {headers: {X-Key: v}, verify: off}}\n')
    assert build(SchedulerConfig, config, {}).source_options["https://o/"]["verify"] is False


def test_the_scrubber_masks_credentials_in_free_text() -> None:
    line = (
        "GET https://u:pw123456@h/x?X-Amz-Signature=deadbeef&part=1 "
        "headers={'Authorization': 'Bearer abcdefghij'} token=zzzzzz"
    )
    out = scrub(line)
    for secret in ("pw123456", "deadbeef", "abcdefghij", "zzzzzz"):
        assert secret not in out, out
    assert "part=1" in out and "https://h/x" in out
    # prose stays prose
    for text in ("invalid option 'x': expected key=value", "the token cannot read it"):
        assert scrub(text) == text


def test_a_node_opens_sources_with_its_own_credentials_and_fences(tmp_path: Path) -> None:
    from syncbit.daemon import SourceCache
    from syncbit.manifest import Manifest
    from syncbit.sources.fences import Fences

    cache = SourceCache(
        {"https://origin/": {"headers": {"X-Key": "the-node-s-own"}}},
        fences=Fences.for_roots([tmp_path]),
    )
    try:
        # A manifest (from a scheduler, possibly a hostile one) cannot set either.
        sent = Manifest(
            dataset="ds",
            source="https://origin/data/",
            source_options={"headers": {"X-Key": "from-the-scheduler"}, "allow_link_local": True},
            revision="r",
            files=[],
        )
        source: Any = cache(sent)
        assert source.headers == {"X-Key": "the-node-s-own"}
        assert source.redirects.allow_link_local is False
        outside = sent.model_copy(update={"source": "file:///etc", "source_options": {}})
        with pytest.raises(InvalidSourceError, match="file_roots"):
            cache(outside)
    finally:
        cache.close()
