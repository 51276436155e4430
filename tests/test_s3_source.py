"""S3Source against a real S3 API server on loopback (moto in server mode), driven by boto3.

Test data goes in through a plain boto3 client; every check reads through the source. Each
test uses its own bucket(s) on one shared server.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import pytest
import trio
from botocore.exceptions import ClientError
from s3server import MotoServer
from sourcehelp import by_path, read

from integration.cluster import free_port
from syncbit.errors import (
    InvalidSourceError,
    SourceChangedError,
    SourceError,
    SourceThrottledError,
    SourceUnavailableError,
    UnsafePathError,
    UserError,
)
from syncbit.manifest import FileEntry, build_manifest
from syncbit.sources import open_source
from syncbit.sources.s3 import S3Source, map_error

RNG = random.Random(4321)
ADMIN_KEY = "admin-key"
SECRET = "very-secret-access-key-do-not-print"
MIB = 1024 * 1024


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Only what a test sets: no host AWS config, profiles, endpoints or instance metadata."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "reader-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture
def admin(moto: MotoServer) -> Iterator[Any]:
    """A plain boto3 client that puts test data in."""
    client = boto3.client(
        "s3",
        endpoint_url=moto.endpoint,
        aws_access_key_id=ADMIN_KEY,
        aws_secret_access_key="admin-secret",
        region_name="us-east-1",
    )
    yield client
    client.close()


@pytest.fixture
def new_bucket(admin: Any) -> Callable[..., str]:
    def make(versioned: bool = False) -> str:
        name = f"t-{uuid.uuid4().hex[:16]}"
        admin.create_bucket(Bucket=name)
        if versioned:
            admin.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
        return name

    return make


@pytest.fixture
def bucket(new_bucket: Callable[..., str]) -> str:
    return new_bucket()


@pytest.fixture
def make_source(moto: MotoServer) -> Iterator[Callable[..., S3Source]]:
    opened: list[S3Source] = []

    def make(uri: str, **options: Any) -> S3Source:
        options.setdefault("endpoint_url", moto.endpoint)
        source = S3Source(uri, options)
        opened.append(source)
        return source

    yield make
    for source in opened:
        source.close()


def put(admin: Any, bucket: str, objects: dict[str, bytes]) -> None:
    for key, data in objects.items():
        admin.put_object(Bucket=bucket, Key=key, Body=data)


# -- listing ------------------------------------------------------------------------------


def test_open_source_finds_the_s3_class_lazily() -> None:
    # A fresh interpreter: the registry must import syncbit.sources.s3 on its own.
    code = (
        "from syncbit.sources import open_source\n"
        "s = open_source('s3://some-bucket/prefix/', {'region': 'us-east-1'})\n"
        "print(type(s).__module__, type(s).__name__, s.bucket, s.prefix)\n"
        "s.close()\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.split() == ["syncbit.sources.s3.source", "S3Source", "some-bucket", "prefix/"]
    source = open_source("s3://b-k-t/x")
    assert isinstance(source, S3Source)
    source.close()


async def test_lists_more_than_1000_keys(
    admin: Any, bucket: str, make_source: Callable[..., S3Source]
) -> None:
    keys = [f"many/k{i:04d}.bin" for i in range(1100)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda k: admin.put_object(Bucket=bucket, Key=k, Body=k.encode()), keys))
    put(admin, bucket, {"many-sibling.bin": b"no", "other/x.bin": b"no"})

    listing = await make_source(f"s3://{bucket}/many/").list()

    assert [f.path for f in listing.files] == [k.removeprefix("many/") for k in keys]
    assert listing.dirs == []
    entry = by_path(listing.files)["k1099.bin"]
    assert await read(make_source(f"s3://{bucket}/many/"), entry, 0, entry.size) == (
        b"many/k1099.bin"
    )


async def test_nested_prefixes_folder_markers_and_exact_keys(
    admin: Any, bucket: str, make_source: Callable[..., S3Source]
) -> None:
    data = {
        "ds/a.bin": RNG.randbytes(3000),
        "ds/zero.txt": b"",
        "ds/sub/b.txt": b"hello",
        "ds/sub/deeper/c.bin": RNG.randbytes(10),
        "ds/\u00fcn\u00ef/\u65e5 #1?%.bin": b"odd name",
        "dsx/outside.bin": b"sibling prefix",
        "ds-outside.bin": b"sibling key",
    }
    put(admin, bucket, data)
    put(admin, bucket, {"ds/": b"", "ds/empty/": b"", "ds/sub/": b""})  # folder markers

    with_slash = await make_source(f"s3://{bucket}/ds/").list()
    without = await make_source(f"s3://{bucket}/ds").list()

    assert with_slash == without
    files = by_path(with_slash.files)
    assert sorted(files) == sorted(
        ["a.bin", "zero.txt", "sub/b.txt", "sub/deeper/c.bin", "\u00fcn\u00ef/\u65e5 #1?%.bin"]
    )
    assert with_slash.dirs == ["empty", "sub"]
    entry = files["sub/deeper/c.bin"]
    assert entry.size == 10
    assert entry.mode == 0o444
    assert entry.locator == "ds/sub/deeper/c.bin"
    assert entry.version["size"] == "10"
    assert entry.version["etag"].startswith('"')
    assert "version_id" not in entry.version
    manifest = build_manifest("ds", f"s3://{bucket}/ds/", with_slash.files, with_slash.dirs)
    assert manifest.dirs == ["empty", "sub", "sub/deeper", "\u00fcn\u00ef"]

    # No trailing slash and the key exists: that one object.
    single = await make_source(f"s3://{bucket}/ds/sub/b.txt").list()
    assert [(f.path, f.locator, f.size) for f in single.files] == [("b.txt", "ds/sub/b.txt", 5)]
    assert single.dirs == []
    # The whole bucket.
    whole = await make_source(f"s3://{bucket}").list()
    assert "ds-outside.bin" in by_path(whole.files)
    assert len(whole.files) == len(data)


async def test_keys_that_would_escape_the_root_are_refused(
    admin: Any, bucket: str, make_source: Callable[..., S3Source]
) -> None:
    put(admin, bucket, {"p/ok.bin": b"1", "p/../x": b"2", "q/ok.bin": b"1", "q//y": b"3"})
    with pytest.raises(UnsafePathError, match=r"unsafe key 'p/\.\./x'"):
        await make_source(f"s3://{bucket}/p/").list()
    with pytest.raises(UnsafePathError, match="unsafe key 'q//y'"):
        await make_source(f"s3://{bucket}/q/").list()


async def test_empty_prefix_and_missing_bucket_are_clear_errors(
    admin: Any, bucket: str, make_source: Callable[..., S3Source]
) -> None:
    put(admin, bucket, {"full/x": b"x"})
    with pytest.raises(InvalidSourceError, match=rf"^nothing under s3://{bucket}/nope/$"):
        await make_source(f"s3://{bucket}/nope").list()
    with pytest.raises(InvalidSourceError, match=rf"^nothing under s3://{bucket}/nope/$"):
        await make_source(f"s3://{bucket}/nope/").list()
    with pytest.raises(InvalidSourceError, match=r"^no such bucket 'no-such-bucket-here'$"):
        await make_source("s3://no-such-bucket-here/p/").list()


@pytest.mark.parametrize(
    ("uri", "options"),
    [
        ("s3://", {}),
        ("s3:///key", {}),
        ("s3://user@bucket/key", {}),
        ("s3:/bucket/key", {}),
        ("s3://bucket/key", {"addressing_style": "sideways"}),
        ("s3://bucket/key", {"max_attempts": 0}),
    ],
)
def test_malformed_uris_and_options(uri: str, options: dict[str, Any]) -> None:
    with pytest.raises(InvalidSourceError):
        S3Source(uri, options)


# -- reads --------------------------------------------------------------------------------


async def test_ranges_read_back_the_bytes(
    admin: Any, bucket: str, make_source: Callable[..., S3Source]
) -> None:
    data = RNG.randbytes(300_001)
    put(admin, bucket, {"r/data.bin": data})
    source = make_source(f"s3://{bucket}/r/", addressing_style="path")
    (entry,) = (await source.list()).files

    assert await read(source, entry, 0, len(data)) == data
    assert await read(source, entry, len(data) - 1, 1) == data[-1:]
    for _ in range(20):
        offset = RNG.randrange(len(data))
        length = RNG.randrange(1, len(data) - offset + 1)
        assert await read(source, entry, offset, length) == data[offset : offset + length]
    source.read_into(entry, 5, memoryview(bytearray(0)))  # nothing to do, no request
    with pytest.raises(ValueError, match="outside"):
        await read(source, entry, len(data) - 10, 11)


async def test_multipart_object(
    admin: Any, bucket: str, make_source: Callable[..., S3Source]
) -> None:
    parts = [RNG.randbytes(5 * MIB), RNG.randbytes(5 * MIB), RNG.randbytes(1000)]
    upload = admin.create_multipart_upload(Bucket=bucket, Key="mp/big.bin")
    done = []
    for number, part in enumerate(parts, 1):
        resp = admin.upload_part(
            Bucket=bucket,
            Key="mp/big.bin",
            UploadId=upload["UploadId"],
            PartNumber=number,
            Body=part,
        )
        done.append({"PartNumber": number, "ETag": resp["ETag"]})
    admin.complete_multipart_upload(
        Bucket=bucket,
        Key="mp/big.bin",
        UploadId=upload["UploadId"],
        MultipartUpload={"Parts": done},
    )
    data = b"".join(parts)
    source = make_source(f"s3://{bucket}/mp/big.bin")
    (entry,) = (await source.list()).files

    assert entry.version["etag"].endswith('-3"')
    assert entry.size == len(data)
    # A range across the first part boundary and the short tail.
    assert await read(source, entry, 5 * MIB - 100, 200) == data[5 * MIB - 100 : 5 * MIB + 100]
    assert await read(source, entry, 10 * MIB, 1000) == parts[2]


async def test_overwrite_after_listing_is_a_source_change(
    admin: Any, new_bucket: Callable[..., str], make_source: Callable[..., S3Source]
) -> None:
    bucket = new_bucket()
    put(admin, bucket, {"c/a.bin": b"A" * 100, "c/b.bin": b"B" * 100})
    source = make_source(f"s3://{bucket}/c/")
    files = by_path((await source.list()).files)
    put(admin, bucket, {"c/a.bin": b"X" * 100})  # same size, other bytes
    admin.delete_object(Bucket=bucket, Key="c/b.bin")

    with pytest.raises(SourceChangedError, match=r"s3://\S+/c/a\.bin no longer has version etag="):
        await read(source, files["a.bin"], 0, 10)
    with pytest.raises(SourceChangedError, match="NoSuchKey"):
        await read(source, files["b.bin"], 0, 10)
    assert not S3Source.is_temp_failure(SourceChangedError("x"))


async def test_versioned_bucket_pins_the_version_read(
    admin: Any, new_bucket: Callable[..., str], make_source: Callable[..., S3Source]
) -> None:
    bucket = new_bucket(versioned=True)
    old, new = RNG.randbytes(1000), RNG.randbytes(2000)
    put(admin, bucket, {"v/w.bin": old, "v/keep.bin": b"keep"})
    source = make_source(f"s3://{bucket}/v/")
    files = by_path((await source.list()).files)
    entry = files["w.bin"]
    version_id = entry.version["version_id"]
    assert version_id and version_id != "null"

    put(admin, bucket, {"v/w.bin": new})
    assert await read(source, entry, 0, 1000) == old
    relisted = by_path((await source.list()).files)["w.bin"]
    assert relisted.size == 2000
    assert relisted.version["version_id"] != version_id
    assert await read(source, relisted, 1500, 500) == new[1500:]
    single = (await make_source(f"s3://{bucket}/v/w.bin").list()).files[0]
    assert single.version == relisted.version

    admin.delete_object(Bucket=bucket, Key="v/w.bin")  # a delete marker: versions remain
    assert await read(source, entry, 10, 20) == old[10:30]
    assert "w.bin" not in by_path((await source.list()).files)
    admin.delete_object(Bucket=bucket, Key="v/w.bin", VersionId=version_id)
    with pytest.raises(SourceChangedError, match=re.escape(f"version_id={version_id}")):
        await read(source, entry, 0, 10)


@pytest.mark.parametrize("versioned", [False, True])
@pytest.mark.parametrize("prefix", ["v/", "v"])
async def test_versioning_is_asked_beside_the_first_listing_request(
    admin: Any,
    new_bucket: Callable[..., str],
    make_source: Callable[..., S3Source],
    versioned: bool,
    prefix: str,
) -> None:
    """The bucket's versioning and the first listing page are asked at once: one round
    trip fewer before a pull starts (20-50 ms against S3). The answer to
    GetBucketVersioning is held until the listing request has been sent; asked in turn,
    the listing would come only after it (and after 5 s here)."""
    bucket = new_bucket(versioned=versioned)
    put(admin, bucket, {"v/a.bin": b"a" * 10, "v/b.bin": b"b" * 20})
    source = make_source(f"s3://{bucket}/{prefix}")
    listing_sent = threading.Event()
    order: list[str] = []

    def sent(model: Any, **_: Any) -> None:
        order.append(f"sent {model.name}")
        if model.name == "ListObjectsV2":
            listing_sent.set()

    def answered(model: Any, **_: Any) -> None:
        if model.name == "GetBucketVersioning":
            listing_sent.wait(5)
        order.append(f"answered {model.name}")

    events = source.client().meta.events
    events.register("before-call.s3", sent)
    events.register("after-call.s3", answered)
    files = by_path((await source.list()).files)

    assert order.index("sent ListObjectsV2") < order.index("answered GetBucketVersioning")
    assert {p: e.size for p, e in files.items()} == {"a.bin": 10, "b.bin": 20}
    assert all(bool(e.version.get("version_id")) is versioned for e in files.values())


async def test_a_listing_entry_without_a_key_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, make_source: Callable[..., S3Source]
) -> None:
    """A store (or something between) that answers a listing with an entry lacking its
    Key gets one clear SourceError, for a single-key prefix's probe as for a page; before,
    the probe indexed the entry and raised KeyError (a traceback)."""
    import syncbit.sources.s3.source as s3source

    pages: list[dict[str, Any]] = []

    def broken(client: Any, **kwargs: Any) -> dict[str, Any]:
        pages.append(kwargs)
        return {"Contents": [{"ETag": '"e"', "Size": 1}]}

    async def unversioned() -> bool:
        return False

    monkeypatch.setattr(s3source, "list_page", broken)
    source = make_source("s3://any-bucket/weights")
    monkeypatch.setattr(source, "_versioned", unversioned)
    with pytest.raises(SourceError, match="entry without a key"):
        await source.list()
    assert [p.get("Prefix") for p in pages] == ["weights", "weights/"]


async def test_same_bytes_under_two_keys_have_one_identity(
    admin: Any, new_bucket: Callable[..., str], make_source: Callable[..., S3Source]
) -> None:
    one, two = new_bucket(), new_bucket()
    blob = RNG.randbytes(5000)
    put(admin, one, {"a/x.bin": blob, "a/other.bin": blob[:-1] + b"!", "b/y/z.bin": blob})
    put(admin, two, {"copy.bin": blob})

    a = by_path((await make_source(f"s3://{one}/a/").list()).files)
    b = by_path((await make_source(f"s3://{one}/b/").list()).files)
    c = by_path((await make_source(f"s3://{two}/copy.bin").list()).files)

    assert a["x.bin"].object == b["y/z.bin"].object == c["copy.bin"].object
    assert a["other.bin"].object != a["x.bin"].object
    assert a["x.bin"].locator != b["y/z.bin"].locator


# -- configuration and credentials ---------------------------------------------------------


async def test_environment_alone_configures_the_client(
    admin: Any, bucket: str, moto: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    put(admin, bucket, {"env/f.txt": b"from env"})
    for endpoint_var, region_var in (
        ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION"),
        ("AWS_ENDPOINT_URL_S3", "AWS_REGION"),
    ):
        monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
        monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
        monkeypatch.setenv(endpoint_var, moto.endpoint)
        monkeypatch.setenv(region_var, "eu-west-3")
        source = open_source(f"s3://{bucket}/env/")
        try:
            (entry,) = (await source.list()).files
            assert isinstance(source, S3Source)
            assert await read(source, entry, 5, 3) == b"env"
            client = await trio.to_thread.run_sync(source.client)
            assert client.meta.region_name == "eu-west-3"
        finally:
            source.close()


async def test_debug_logging_never_shows_credentials(
    admin: Any,
    bucket: str,
    make_source: Callable[..., S3Source],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    put(admin, bucket, {"log/f.txt": b"logged"})
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token-that-is-secret")
    caplog.set_level(logging.DEBUG)
    source = make_source(f"s3://{bucket}/log/")
    (entry,) = (await source.list()).files
    assert await read(source, entry, 0, 6) == b"logged"
    with pytest.raises(InvalidSourceError):
        await make_source(f"s3://{bucket}/nothing/").list()
    for secret in (SECRET, "session-token-that-is-secret", "Signature=", "Authorization"):
        assert secret not in caplog.text


async def test_named_profile(
    admin: Any,
    bucket: str,
    make_source: Callable[..., S3Source],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    put(admin, bucket, {"prof/f.txt": b"profile"})
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    credentials = tmp_path / "credentials"
    credentials.write_text(
        "[syncbit-test]\naws_access_key_id = profile-key\naws_secret_access_key = p-secret\n"
    )
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))

    (entry,) = (await make_source(f"s3://{bucket}/prof/", profile="syncbit-test").list()).files
    assert entry.path == "f.txt"
    with pytest.raises(InvalidSourceError, match="AWS profile 'nope' not found"):
        await make_source(f"s3://{bucket}/prof/", profile="nope").list()


async def test_no_credentials_is_a_clear_error(
    admin: Any, bucket: str, make_source: Callable[..., S3Source], monkeypatch: pytest.MonkeyPatch
) -> None:
    put(admin, bucket, {"nc/f.txt": b"x"})
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(InvalidSourceError, match="no AWS credentials found") as info:
        await make_source(f"s3://{bucket}/nc/").list()
    assert isinstance(info.value, UserError)


async def test_refused_credentials_under_enforced_auth(
    admin: Any,
    bucket: str,
    moto: MotoServer,
    make_source: Callable[..., S3Source],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """moto checks signatures and IAM policies once auth is enforced (server-wide, so the
    switch is undone before the test ends). The source lists the whole bucket: moto 5.2
    miscomputes the signature of listings whose query holds a `/` (`prefix=a%2F`)."""
    put(admin, bucket, {"f.txt": b"guarded"})
    iam = boto3.client(
        "iam",
        endpoint_url=moto.endpoint,
        aws_access_key_id=ADMIN_KEY,
        aws_secret_access_key="admin-secret",
        region_name="us-east-1",
    )
    try:
        suffix = uuid.uuid4().hex[:8]
        reader, nobody = f"reader-{suffix}", f"nobody-{suffix}"
        iam.create_user(UserName=reader)
        iam.create_user(UserName=nobody)
        iam.put_user_policy(
            UserName=reader,
            PolicyName="read",
            PolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [
                        {
                            "Effect": "Allow",
                            "Action": ["s3:ListBucket", "s3:GetObject"],
                            "Resource": "*",
                        }
                    ],
                }
            ),
        )
        reader_key = iam.create_access_key(UserName=reader)["AccessKey"]
        nobody_key = iam.create_access_key(UserName=nobody)["AccessKey"]
    finally:
        iam.close()

    def use(key_id: str, secret: str) -> None:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)

    where = f"s3://{bucket}/"
    moto.enforce_auth()
    try:
        # Allowed to list and read, not to ask for the versioning state: still works.
        use(reader_key["AccessKeyId"], reader_key["SecretAccessKey"])
        source = make_source(where)
        (entry,) = (await source.list()).files
        assert await read(source, entry, 0, 7) == b"guarded"

        cases = [
            (nobody_key["AccessKeyId"], nobody_key["SecretAccessKey"], "AccessDenied"),
            ("AKIDUNKNOWN", SECRET, "InvalidAccessKeyId"),
            (reader_key["AccessKeyId"], SECRET, "SignatureDoesNotMatch"),
        ]
        for key_id, secret, code in cases:
            use(key_id, secret)
            with pytest.raises(InvalidSourceError) as info:
                await make_source(where).list()
            message = str(info.value)
            assert message == f"access denied to {where} (check credentials): {code}"
            assert secret not in message
            with pytest.raises(SourceError, match="access denied") as read_info:
                await read(make_source(where), entry, 0, 7)
            assert secret not in str(read_info.value)
    finally:
        moto.enforce_auth(False)


async def test_unreachable_endpoint_is_temporary(
    admin: Any, bucket: str, make_source: Callable[..., S3Source]
) -> None:
    put(admin, bucket, {"u/f.bin": b"12345"})
    (entry,) = (await make_source(f"s3://{bucket}/u/").list()).files
    dead = f"http://127.0.0.1:{free_port()}"

    with pytest.raises(SourceUnavailableError, match=re.escape(f"cannot reach {dead} ")) as info:
        await make_source(f"s3://{bucket}/u/", endpoint_url=dead, max_attempts=1).list()
    assert S3Source.is_temp_failure(info.value)
    with pytest.raises(SourceUnavailableError):
        await read(make_source(f"s3://{bucket}/u/", endpoint_url=dead, max_attempts=1), entry, 0, 5)


async def test_deleted_bucket_is_a_source_change(
    admin: Any, new_bucket: Callable[..., str], make_source: Callable[..., S3Source]
) -> None:
    bucket = new_bucket()
    put(admin, bucket, {"d/f.bin": b"12345"})
    source = make_source(f"s3://{bucket}/d/")
    (entry,) = (await source.list()).files
    admin.delete_object(Bucket=bucket, Key="d/f.bin")
    admin.delete_bucket(Bucket=bucket)
    with pytest.raises(SourceChangedError):
        await read(source, entry, 0, 5)


def _client_error(code: str, status: int, message: str = "") -> ClientError:
    return ClientError(
        {
            "Error": {"Code": code, "Message": message},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        "ListObjectsV2",
    )


@pytest.mark.parametrize(
    ("code", "status", "kind", "text"),
    [
        ("ExpiredToken", 400, InvalidSourceError, "AWS credentials expired"),
        ("SlowDown", 503, SourceThrottledError, "S3 asks to slow down"),
        ("ThrottlingException", 400, SourceThrottledError, "S3 asks to slow down"),
        ("ServiceUnavailable", 503, SourceThrottledError, "S3 asks to slow down"),
        ("RequestTimeout", 400, SourceUnavailableError, "S3 unavailable"),
        ("InternalError", 500, SourceUnavailableError, "S3 unavailable"),
        ("403", 403, InvalidSourceError, "access denied"),
        ("InvalidObjectState", 403, InvalidSourceError, "archived"),
        ("RequestTimeTooSkewed", 403, InvalidSourceError, "clock"),
        ("WeirdCode", 400, SourceError, "failed: WeirdCode"),
    ],
)
def test_error_mapping_for_errors_moto_does_not_produce(
    code: str, status: int, kind: type[Exception], text: str
) -> None:
    """Expired tokens and throttling that outlasts botocore's retries cannot be provoked
    on moto: the mapping is checked on the errors botocore would raise."""
    exc = _client_error(code, status, message=f"echoes {SECRET}")
    mapped = map_error(exc, "s3://b/p/", "b")
    assert type(mapped) is kind
    assert text in str(mapped)
    assert SECRET not in str(mapped)


def test_close_is_idempotent_and_final() -> None:
    source = S3Source("s3://b-k-t/p/", {"endpoint_url": "http://127.0.0.1:9"})
    source.client()
    source.close()
    source.close()
    with pytest.raises(SourceError, match="closed"):
        source.client()


def test_slow_down_carries_the_retry_after_the_server_gave() -> None:
    """A throttling answer outlasting botocore's own retries reaches the fetcher with the
    wait the server asked for, so it backs off that long instead of guessing."""
    exc = ClientError(
        {
            "Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."},
            "ResponseMetadata": {"HTTPStatusCode": 503, "HTTPHeaders": {"retry-after": "4"}},
        },
        "GetObject",
    )
    mapped = map_error(exc, "s3://b/k", "b", reading=True)
    assert isinstance(mapped, SourceThrottledError) and mapped.retry_after == 4.0
    bare = map_error(_client_error("SlowDown", 503), "s3://b/k", "b")
    assert isinstance(bare, SourceThrottledError) and bare.retry_after is None


# -- connections ---------------------------------------------------------------------------


class _SlowRanges(ThreadingHTTPServer):
    """An S3-shaped endpoint that answers every ranged GetObject after a pause, so that
    concurrent reads are concurrent for sure, and counts the connections it accepted."""

    daemon_threads = True

    def __init__(self, data: bytes, pause: float) -> None:
        self.data, self.pause, self.connections = data, pause, 0
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _SlowRangesHandler)


class _SlowRangesHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a client may reuse the connection
    server: _SlowRanges

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections += 1

    def do_GET(self) -> None:
        first, last = map(int, self.headers["Range"].removeprefix("bytes=").split("-"))
        time.sleep(self.server.pause)
        body = self.server.data[first : last + 1]
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {first}-{last}/{len(self.server.data)}")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", '"e1"')
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_as_many_reads_at_once_as_the_fetcher_runs_keep_their_connections() -> None:
    """The fetcher runs up to `source_concurrency` (64) reads at once per source: the
    client's pool keeps that many connections, so a second round of 24 concurrent reads
    opens none (a pool of 16 discarded 8 after each round and connected anew: on real S3
    a TLS handshake per read)."""
    data = RNG.randbytes(64 * 1024)
    server = _SlowRanges(data, pause=0.3)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    source = S3Source(
        "s3://b/k",
        {
            "endpoint_url": f"http://127.0.0.1:{server.server_address[1]}",
            "addressing_style": "path",
        },
    )
    entry = FileEntry(
        path="k", size=len(data), object="ab" * 32, locator="k", version={"etag": '"e1"'}
    )

    def read_one(i: int) -> bytes:
        buf = bytearray(1024)
        source.read_into(entry, i * 1024, memoryview(buf))
        return bytes(buf)

    try:
        for _ in range(2):
            with ThreadPoolExecutor(24) as pool:
                got = list(pool.map(read_one, range(24)))
            assert got == [data[i * 1024 : (i + 1) * 1024] for i in range(24)]
        assert server.connections == 24
    finally:
        source.close()
        server.shutdown()
        server.server_close()


# -- reads by presigned URL ------------------------------------------------------------------


async def test_reads_go_by_presigned_url_signed_once_a_while(
    admin: Any, bucket: str, make_source: Callable[..., S3Source], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ranged reads take syncbit's own HTTP client with one presigned URL per object
    version (boto3 only signs), so they can be raced and cut short (`abortable`)."""
    data = RNG.randbytes(200_000)
    put(admin, bucket, {"p/a.bin": data, "p/b.bin": data[:1000]})
    source = make_source(f"s3://{bucket}/p/")
    files = by_path((await source.list()).files)
    for offset in (0, 5000, 150_000):
        assert await read(source, files["a.bin"], offset, 777) == data[offset : offset + 777]
    direct = source.direct()
    assert source.abortable and direct is not None and direct.signed == 1
    assert await read(source, files["b.bin"], 0, 1000) == data[:1000]
    assert direct.signed == 2  # one per object
    monkeypatch.setattr("syncbit.sources.s3.direct.REUSED_FOR", 0.0)
    assert await read(source, files["a.bin"], 10, 10) == data[10:20]
    assert direct.signed == 3  # signed anew once old: credentials rotate


class _Refusing(ThreadingHTTPServer):
    """Answers every request with `status` (301: as S3 does a bucket of another region),
    counting them."""

    daemon_threads = True

    def __init__(self, status: int) -> None:
        self.requests = 0
        self.status = status
        super().__init__(("127.0.0.1", 0), _RefusingHandler)


class _RefusingHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Refusing

    def do_GET(self) -> None:
        self.server.requests += 1
        body = b"<Error><Code>PermanentRedirect</Code></Error>"
        self.send_response(self.server.status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.parametrize("status", [301, 405])  # 405 to an unversioned read: not a change
async def test_an_answer_only_boto3_can_judge_moves_the_reads_to_boto3(
    status: int,
    admin: Any,
    bucket: str,
    make_source: Callable[..., S3Source],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A redirect (another region), credentials or a CA the presigned way cannot judge:
    boto3 reads it, and from then on every read of the source."""
    refusing = _Refusing(status)
    thread = threading.Thread(target=refusing.serve_forever, daemon=True)
    thread.start()
    port = refusing.server_address[1]

    def elsewhere(client: Any, bucket: str) -> Callable[[str, str | None], str]:
        return lambda key, version: f"http://127.0.0.1:{port}/{bucket}/{key}?X-Amz-Signature=s"

    monkeypatch.setattr("syncbit.sources.s3.source.presigner", elsewhere)
    data = RNG.randbytes(5000)
    put(admin, bucket, {"m/f.bin": data})
    source = make_source(f"s3://{bucket}/m/")
    (entry,) = (await source.list()).files
    try:
        with caplog.at_level(logging.WARNING, logger="syncbit.sources.s3"):
            assert await read(source, entry, 100, 200) == data[100:300]
            assert await read(source, entry, 0, 5000) == data
        assert not source.abortable and source.direct() is None
        assert refusing.requests == 1
        assert "go through boto3 from now on" in caplog.text and f"HTTP {status}" in caplog.text
    finally:
        refusing.shutdown()
        refusing.server_close()


async def test_a_presigned_url_never_reaches_a_message(
    admin: Any,
    bucket: str,
    moto: MotoServer,
    make_source: Callable[..., S3Source],
    caplog: pytest.LogCaptureFixture,
) -> None:
    put(admin, bucket, {"s/f.bin": b"secret bytes"})
    source = make_source(f"s3://{bucket}/s/")
    (entry,) = (await source.list()).files
    direct = source.direct()
    assert direct is not None
    dead = free_port()
    url = direct.url(entry.locator, None)
    found = re.search(r"X-Amz-Signature=([0-9a-f]{64})", url)
    assert found is not None  # SigV4
    signature = found.group(1)
    real = direct.presign
    direct.presign = lambda key, version: real(key, version).replace(
        moto.endpoint, f"http://127.0.0.1:{dead}"
    )
    direct.url(entry.locator, None, fresh=True)  # the one to a dead port
    with caplog.at_level(logging.DEBUG), pytest.raises(SourceUnavailableError) as info:
        await read(source, entry, 0, 5)
    assert f"s3://{bucket}/s/f.bin" in str(info.value)
    for text in (str(info.value), caplog.text):
        assert "X-Amz-" not in text and signature not in text and SECRET not in text


def test_reads_stay_with_boto3_behind_a_proxy_or_when_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("NO_PROXY", "")
    endpoint = {"endpoint_url": "http://s3.internal:9000"}
    assert not S3Source("s3://b/p/", endpoint).abortable  # boto3 honours the proxy
    monkeypatch.setenv("NO_PROXY", "s3.internal")
    assert S3Source("s3://b/p/", endpoint).abortable
    source = S3Source("s3://b/p/", {**endpoint, "direct_reads": "false"})
    assert not source.abortable and source.direct() is None
    source.close()


def test_warm_up_reads_what_a_client_reads_once_per_process() -> None:
    """A daemon or scheduler warms the S3 and Hub client stacks at start (`warm_up`, its
    own thread): building the first S3 client of a dataset then reads no botocore data
    file, and boto3's data path is not appended to the shared loader once per client."""
    code = (
        "import sys\n"
        "import botocore.loaders\n"
        "from syncbit.sources.base import warm_up\n"
        "if sys.argv[1] == 'warm':\n"
        "    warm_up()\n"
        "reads = []\n"
        "real = botocore.loaders.JSONFileLoader.load_file\n"
        "def load_file(self, path):\n"
        "    reads.append(path)\n"
        "    return real(self, path)\n"
        "botocore.loaders.JSONFileLoader.load_file = load_file\n"
        "from syncbit.sources.s3 import source\n"
        "from syncbit.sources.s3.source import S3Source\n"
        "for i in range(3):\n"
        "    s = S3Source('s3://b/p/', {'endpoint_url': 'http://127.0.0.1:9'})\n"
        "    s.client()\n"
        "    s.close()\n"
        "paths = source._loader.search_paths\n"
        "hub = 'huggingface_hub.hf_api' in sys.modules\n"
        "print(len(reads), len(paths) == len(set(paths)), hub)\n"
    )
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}

    def run(mode: str) -> list[str]:
        out = subprocess.run(
            [sys.executable, "-c", code, mode],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
            env=env,
        )
        return out.stdout.split()

    assert run("warm") == ["0", "True", "True"]  # the Hub's client imported too
    cold = run("cold")
    assert int(cold[0]) > 0 and cold[1:] == ["True", "False"]  # the first client read them
