"""S3-compatible object storage (AWS S3, SeaweedFS, MinIO...) for replicas that share one registry.

URL: ``s3://bucket/prefix?endpoint=http://127.0.0.1:8333&region=us-east-1``. Credentials come from
the usual AWS environment variables / config. A put's commit point is ``put_object(IfNoneMatch="*")``
on the version's manifest: two replicas can never take the same version number.
"""

from __future__ import annotations

import functools
import os
from urllib.parse import parse_qs, urlparse

from adapters_store.errors import InvalidRequest, NotFound, StoreUnavailable
from adapters_store.store import ObjectStore
from adapters_store.validation import StoreLimits


def _unreachable_is_503(method):
    """Connection failures, timeouts and 5xx answers of the S3 server become ``StoreUnavailable``
    (503 + Retry-After to clients) instead of a botocore traceback and a 500."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

        try:
            return method(self, *args, **kwargs)
        except (ConnectionError, HTTPClientError) as e:
            raise StoreUnavailable(
                f"the adapter store is unreachable ({type(e).__name__}); retry later"
            ) from None
        except ClientError as e:
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            if status >= 500:
                code = e.response.get("Error", {}).get("Code", status)
                raise StoreUnavailable(f"the adapter store answered {code}; retry later") from None
            raise

    return wrapper


class S3Store(ObjectStore):
    def __init__(self, url: str, limits: StoreLimits | None = None, client=None):
        import boto3
        from botocore.config import Config

        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise InvalidRequest(f"S3 store URL must look like s3://bucket/prefix, got {url!r}")
        query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/") + "/" if parsed.path.strip("/") else ""
        self.url = url
        self.limits = limits or StoreLimits()
        endpoint = (
            query.get("endpoint")
            or os.environ.get("LORAPLEX_S3_ENDPOINT")
            or os.environ.get("AWS_ENDPOINT_URL")
        )
        self.client = client or boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name=query.get("region") or os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
            # Few, short retries: while the store is down a cold request should get its 503 in about a
            # second or two, not hold a worker for the ~15 s five attempts take.
            config=Config(
                retries={"max_attempts": 3, "mode": "standard"},
                connect_timeout=5,
                read_timeout=30,
                s3={"addressing_style": "path"},
            ),
        )

    def _k(self, key: str) -> str:
        return self.prefix + key

    @_unreachable_is_503
    def _read(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._k(key))["Body"].read()
        except self.client.exceptions.NoSuchKey:
            raise NotFound(key) from None

    @_unreachable_is_503
    def _write(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data)

    @_unreachable_is_503
    def _create(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data, IfNoneMatch="*")
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in (
                "PreconditionFailed",
                "ConditionalRequestConflict",
                "412",
            ):
                return False
            raise

    @_unreachable_is_503
    def _delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._k(key))

    @_unreachable_is_503
    def _list(self, prefix: str) -> list[tuple[str, float]]:
        out = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._k(prefix)):
            for obj in page.get("Contents", []):
                out.append((obj["Key"][len(self.prefix) :], obj["LastModified"].timestamp()))
        return out

    @_unreachable_is_503
    def _names(self, prefix: str) -> list[str]:
        # Delimiter '/': the server leaves out everything in sub-folders.
        out, start = [], len(self._k(prefix))
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._k(prefix), Delimiter="/"):
            out.extend(obj["Key"][start:] for obj in page.get("Contents", []))
        return out

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (tests and first-time setup)."""
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self.client.create_bucket(Bucket=self.bucket)
