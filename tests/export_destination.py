"""A second S3 server for exports: moto, with authentication on and credentials of its own.

moto checks signatures and IAM policies once INITIAL_NO_AUTH_ACTION_COUNT actions have run
without: those first actions create the user Bunch exports as, its policy and its access key.
After that, a wrong secret is refused (SignatureDoesNotMatch) as AWS refuses it.
"""

import asyncio
import json
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import boto3
from minio import Minio
from minio.commonconfig import ENABLED
from minio.versioningconfig import VersioningConfig

from deploy.processes import Process, base_env, free_port, wait_http

SETUP_ACTIONS = 3  # create_user, put_user_policy, create_access_key
ALLOW_S3 = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}


@dataclass
class DestinationServer:
    process: Process
    url: str
    access_key: str
    secret_key: str

    def client(self) -> Minio:
        return Minio(
            self.url.removeprefix("http://"), self.access_key, self.secret_key, secure=False, region="us-east-1"
        )

    def make_bucket(self, name: str, versioned: bool = True) -> None:
        """A bucket; versioned, so every PUT of a key is counted (as one version each)."""
        client = self.client()
        client.make_bucket(name)
        if versioned:
            client.set_bucket_versioning(name, VersioningConfig(ENABLED))

    def versions(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """How many times each key was written."""
        counts: dict[str, int] = {}
        for item in self.client().list_objects(bucket, prefix=prefix, recursive=True, include_version=True):
            name = item.object_name or ""
            counts[name] = counts.get(name, 0) + 1
        return counts


def start_destination_server(workdir: Path) -> DestinationServer:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    moto = Path(sys.executable).with_name("moto_server")
    env = base_env({"INITIAL_NO_AUTH_ACTION_COUNT": str(SETUP_ACTIONS)})
    proc = Process("destination-s3", [str(moto), "-H", "127.0.0.1", "-p", str(port)], env, workdir / "dest-s3.log")
    proc.start()
    wait_http(url + "/moto-api/", proc)
    iam = boto3.client(
        "iam", endpoint_url=url, region_name="us-east-1", aws_access_key_id="setup", aws_secret_access_key="setup"
    )
    iam.create_user(UserName="exporter")
    iam.put_user_policy(UserName="exporter", PolicyName="s3", PolicyDocument=json.dumps(ALLOW_S3))
    key = iam.create_access_key(UserName="exporter")["AccessKey"]
    return DestinationServer(proc, url, key["AccessKeyId"], key["SecretAccessKey"])


class SlowProxy:
    """A TCP proxy to a server that holds each new connection `delay` seconds before it connects:
    every request to moto (which closes each connection after its answer) takes that much longer,
    so an export is still under way when a test kills its packager. It runs on a thread of its own,
    so it keeps serving whatever the test's event loop does."""

    def __init__(self, target: str, delay: float) -> None:
        self.target_port = int(target.rsplit(":", 1)[1])
        self.delay = delay
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def start(self) -> "SlowProxy":
        self._thread.start()
        self._started.wait(10)
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self._started.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(self.delay)
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(
            _pipe(client_reader, server_writer), _pipe(server_reader, client_writer), return_exceptions=True
        )


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()
