"""moto's S3 server on 127.0.0.1, for the tests that run folders on a real S3 protocol
(tests/test_s3_runs.py through s3fs in this process, tests/test_executors.py from Ray workers)."""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass
from typing import Any, Iterator


@dataclass
class LoopbackS3:
    """The server's endpoint, the standard AWS variables that reach it (what a user's machines
    would have for a real bucket) and a boto3 client on it."""

    endpoint: str
    env: dict[str, str]
    client: Any

    def bucket(self, prefix: str = "wb") -> str:
        """A new empty bucket's ``s3://`` URL (made with boto3: s3fs's ``mkdir`` sends a location
        constraint moto refuses)."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client.create_bucket(Bucket=name)
        return f"s3://{name}"


def available() -> bool:
    """Whether moto's server and s3fs are installed (both in the ``dev`` extra)."""
    try:
        import boto3  # noqa: F401
        import s3fs  # noqa: F401
        from moto.server import ThreadedMotoServer  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def loopback_s3() -> Iterator[LoopbackS3]:
    """An S3 server on 127.0.0.1 (a free port) for the block."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        env = {
            "AWS_ENDPOINT_URL_S3": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        yield LoopbackS3(endpoint, env, client)
    finally:
        server.stop()
