"""S3-compatible object storage (AWS S3, SeaweedFS, MinIO...) for replicas that share one registry.

URL: ``s3://bucket/prefix?endpoint=http://127.0.0.1:8333&region=us-east-1``. Credentials come from
the usual AWS environment variables / config (boto3 reads them; loraplex never holds or prints them).
A put's commit point is ``put_object(IfNoneMatch="*")`` on the version's manifest: two replicas can
never take the same version number. Every botocore failure becomes one :class:`StoreUnavailable`
line naming the store and what to check, never a traceback or a server-supplied message.
"""

from __future__ import annotations

import contextlib
import os
from urllib.parse import parse_qs, urlparse, urlsplit

from adapters_store.errors import InvalidRequest, LoraplexError, NotFound, StoreUnavailable
from adapters_store.store import ObjectStore
from adapters_store.validation import StoreLimits


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
        self.endpoint = _without_userinfo(endpoint) if endpoint else "the default AWS endpoint"
        try:
            self.client = client or boto3.client(
                "s3",
                endpoint_url=endpoint,
                region_name=query.get("region") or os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
                # Three attempts: a wrong endpoint is reported in about a second, not after ~10 s.
                config=Config(
                    retries={"max_attempts": 3, "mode": "standard"},
                    connect_timeout=10,
                    s3={"addressing_style": "path"},
                ),
            )
        except ValueError:
            raise InvalidRequest(
                f"S3 store s3://{self.bucket}/{self.prefix}: the endpoint {self.endpoint!r} is not a valid URL"
            ) from None

    @contextlib.contextmanager
    def _errors(self):
        """botocore exceptions -> one StoreUnavailable line (store, endpoint, what to check)."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        where = f"S3 store s3://{self.bucket}/{self.prefix} at {self.endpoint}"
        try:
            yield
        except LoraplexError:
            raise
        except (NoCredentialsError, PartialCredentialsError):
            raise StoreUnavailable(
                f"{where}: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
            ) from None
        except ConnectionError:
            raise StoreUnavailable(
                f"{where}: cannot connect; check the URL's ?endpoint= (or AWS_ENDPOINT_URL / LORAPLEX_S3_ENDPOINT)"
            ) from None
        except ClientError as e:
            # The server's own message is left out: it is not ours to print.
            code = str(e.response.get("Error", {}).get("Code", "unknown"))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _CREDENTIAL_CODES or status == 403:
                raise StoreUnavailable(
                    f"{where}: the credentials were refused ({code}); check AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY"
                ) from None
            if code == "NoSuchBucket":
                raise StoreUnavailable(f"{where}: bucket {self.bucket!r} does not exist") from None
            raise StoreUnavailable(f"{where}: request failed ({code}, HTTP {status})") from None
        except BotoCoreError as e:
            raise StoreUnavailable(f"{where}: {type(e).__name__}") from None

    def _k(self, key: str) -> str:
        return self.prefix + key

    def _read(self, key: str) -> bytes:
        with self._errors():
            try:
                return self.client.get_object(Bucket=self.bucket, Key=self._k(key))["Body"].read()
            except self.client.exceptions.NoSuchKey:
                raise NotFound(key) from None

    def _write(self, key: str, data: bytes) -> None:
        with self._errors():
            self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data)

    def _create(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        with self._errors():
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

    def _delete(self, key: str) -> None:
        with self._errors():
            self.client.delete_object(Bucket=self.bucket, Key=self._k(key))

    def _list(self, prefix: str) -> list[tuple[str, float]]:
        out = []
        with self._errors():
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._k(prefix)):
                for obj in page.get("Contents", []):
                    out.append((obj["Key"][len(self.prefix) :], obj["LastModified"].timestamp()))
        return out

    def _names(self, prefix: str) -> list[str]:
        # Delimiter '/': the server leaves out everything in sub-folders.
        out, start = [], len(self._k(prefix))
        with self._errors():
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._k(prefix), Delimiter="/"):
                out.extend(obj["Key"][start:] for obj in page.get("Contents", []))
        return out

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (tests and first-time setup)."""
        from botocore.exceptions import ClientError

        with self._errors():
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except ClientError:
                self.client.create_bucket(Bucket=self.bucket)


_CREDENTIAL_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AccessDenied",
        "InvalidToken",
        "ExpiredToken",
        "InvalidClientTokenId",
        "AuthorizationHeaderMalformed",
    }
)


def _without_userinfo(url: str) -> str:
    """An endpoint as printed: never ``user:password@``."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    return parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")).geturl()
