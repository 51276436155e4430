"""S3 sources: `s3://bucket/prefix` on AWS or any S3-compatible store, through boto3.

Owns pinning each object to its ETag (and VersionId on versioned buckets), ranged reads
that refuse any other version, and mapping botocore errors onto syncbit's. boto3 is
synchronous: it never runs on the trio loop, and credentials, signatures and signed URLs
never reach a message or a log line.

    errors   botocore errors and codes -> syncbit errors
    listing  list/HEAD calls, pagination, page entries (safe names, pinned ETags)
    direct   ranged reads by presigned URL through wire.Pool (boto3 signs)
    source   S3Source (registered as s3://): the client, listing, range reads; warm()
"""

from syncbit.sources.s3.errors import map_error
from syncbit.sources.s3.listing import page_entries
from syncbit.sources.s3.source import OPTION_KEYS, S3Source, warm

__all__ = ["OPTION_KEYS", "S3Source", "map_error", "page_entries", "warm"]
