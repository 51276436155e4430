"""S3 listings: the boto3 calls that list and HEAD (worker threads only), pagination
tokens, and the entries of one ListObjectsV2 / ListObjectVersions page. Whatever a page
says, what comes out is only safe names below the listed prefix, each pinned to its ETag.
"""

from __future__ import annotations

from typing import Any

from syncbit.chunks import identity_digest
from syncbit.errors import InvalidSourceError, SourceError, UnsafePathError
from syncbit.manifest import FileEntry, safe_relpath


def list_page(client: Any, **kwargs: Any) -> dict[str, Any]:
    page: dict[str, Any] = client.list_objects_v2(**kwargs)
    return page


def list_versions_page(client: Any, **kwargs: Any) -> dict[str, Any]:
    page: dict[str, Any] = client.list_object_versions(**kwargs)
    return page


def head_object(client: Any, **kwargs: Any) -> dict[str, Any]:
    resp: dict[str, Any] = client.head_object(**kwargs)
    return resp


def next_token(page: dict[str, Any], versioned: bool) -> dict[str, str]:
    if not page.get("IsTruncated"):
        return {}
    if versioned:
        token = {"KeyMarker": page.get("NextKeyMarker", "")}
        if page.get("NextVersionIdMarker"):
            token["VersionIdMarker"] = page["NextVersionIdMarker"]
        if not token["KeyMarker"]:
            raise SourceError("S3 listing truncated without a next marker")
        return token
    if not page.get("NextContinuationToken"):
        raise SourceError("S3 listing truncated without a continuation token")
    return {"ContinuationToken": page["NextContinuationToken"]}


def page_entries(
    page: Any, bucket: str, prefix: str, versioned: bool
) -> tuple[list[FileEntry], set[str]]:
    """The files and directory markers one ListObjectsV2 (or, `versioned`, one
    ListObjectVersions: latest versions only) page holds under `prefix`.

    Whatever the page says, the result is only safe names below `prefix`; a page that is
    not what S3 sends raises SourceError, an unsafe key UnsafePathError, an object
    without an ETag InvalidSourceError.
    """
    if not isinstance(page, dict):
        raise SourceError(f"S3 listing of s3://{bucket}/{prefix} is not a listing")
    raw = page.get("Versions" if versioned else "Contents") or []
    if not isinstance(raw, list):
        raise SourceError(f"S3 listing of s3://{bucket}/{prefix} is not a listing")
    files: list[FileEntry] = []
    dirs: set[str] = set()
    for obj in raw:
        if not isinstance(obj, dict) or not isinstance(obj.get("Key"), str):
            raise SourceError(f"S3 listing of s3://{bucket}/{prefix} has an entry without a key")
        if versioned and not obj.get("IsLatest"):
            continue
        key: str = obj["Key"]
        if not key.startswith(prefix):
            raise SourceError(f"S3 listing of s3://{bucket}/{prefix} has key {key!r} outside it")
        name = key[len(prefix) :]
        if not name:
            continue  # the folder marker of the listed prefix itself
        if name.endswith("/"):
            dirs.add(safe_name(name[:-1], key, bucket))
            continue
        files.append(file_entry(bucket, safe_name(name, key, bucket), obj, versioned))
    return files, dirs


def file_entry(bucket: str, name: str, obj: dict[str, Any], versioned: bool) -> FileEntry:
    etag = obj.get("ETag") or ""
    if not isinstance(etag, str) or not etag.strip('"'):
        raise InvalidSourceError(
            f"s3://{bucket}/{obj['Key']} has no ETag: its version cannot be pinned"
        )
    size = obj.get("Size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise SourceError(f"s3://{bucket}/{obj['Key']} has no valid size: {size!r}")
    version = {"etag": etag, "size": str(size)}
    version_id = obj.get("VersionId")
    if versioned and version_id:
        version["version_id"] = str(version_id)
    return FileEntry(
        path=name,
        size=size,
        mode=0o444,
        # Quotes are transport syntax; some S3 clones omit them.
        object=identity_digest("s3-etag", etag.strip('"'), str(size)),
        locator=obj["Key"],
        version=version,
    )


def safe_name(name: str, key: str, bucket: str) -> str:
    try:
        return safe_relpath(name)
    except UnsafePathError as exc:
        raise UnsafePathError(f"unsafe key {key!r} in s3://{bucket}/: {exc}") from None
