"""A real S3 server for tests: Ceph's radosgw on a throwaway single-node cluster (scripts/radosgw.sh).

``running_radosgw(directory)`` starts a monitor, an OSD (memstore) and radosgw on 127.0.0.1 and
yields an ``S3Info``; leaving the block stops them and removes *directory*. ``S3Info.client()``
is a botocore S3 client for it; ``S3Info.registry_storage(bucket, endpoint)`` is the
``storage`` section that puts a docker-registry's blobs in that bucket, reached at *endpoint*
(default: radosgw itself; a proxy in front of it may be named instead, and the registry's
presigned redirect URLs then point there).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "radosgw.sh"
TOOLS = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin")


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


@dataclass(frozen=True, slots=True)
class S3Info:
    endpoint: str  # http://127.0.0.1:PORT
    access_key: str
    secret_key: str
    directory: Path

    @property
    def port(self) -> int:
        return int(self.endpoint.rsplit(":", 1)[1])

    def client(self, endpoint: str | None = None):
        import botocore.config
        import botocore.session

        session = botocore.session.get_session()
        return session.create_client(
            "s3", endpoint_url=endpoint or self.endpoint, region_name="us-east-1",
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=botocore.config.Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        )

    def registry_storage(self, bucket: str, endpoint: str | None = None, *, redirect: bool = True) -> dict:
        """docker-registry's S3 driver section for *bucket* (created if missing)."""
        with contextlib.suppress(self.client().exceptions.BucketAlreadyOwnedByYou):
            self.client().create_bucket(Bucket=bucket)
        storage: dict = {"s3": {"region": "us-east-1", "regionendpoint": endpoint or self.endpoint, "bucket": bucket,
                                "accesskey": self.access_key, "secretkey": self.secret_key, "secure": False,
                                "v4auth": True, "chunksize": 5 << 20}}
        if not redirect:
            storage["redirect"] = {"disable": True}
        return storage

    def blob_key(self, digest: str) -> str:
        """The bucket key docker-registry stores blob *digest* under."""
        algorithm, _, hexdigest = digest.partition(":")
        return f"docker/registry/v2/blobs/{algorithm}/{hexdigest[:2]}/{hexdigest}/data"


@contextlib.contextmanager
def running_radosgw(directory: str | os.PathLike) -> Iterator[S3Info]:
    directory = Path(directory)
    proc = subprocess.run(["bash", str(SCRIPT), "start", str(directory)], capture_output=True, text=True, timeout=300)
    if proc.returncode:
        subprocess.run(["bash", str(SCRIPT), "stop", str(directory)], capture_output=True, timeout=120)
        raise RuntimeError(f"scripts/radosgw.sh start failed ({proc.returncode}): {proc.stderr[-3000:]}")
    try:
        values = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
        yield S3Info(values["S3_ENDPOINT"], values["S3_ACCESS_KEY"], values["S3_SECRET_KEY"], directory)
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(directory)], capture_output=True, timeout=120)
