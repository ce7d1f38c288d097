"""S3 stand-ins for tests and benchmarks: moto's S3 server in a process of its own, and a proxy in front of it that
answers uploads slowly, as an object store far away does."""
from __future__ import annotations

import contextlib
import http.client
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from ray_finetune.ports import free_port


@contextlib.contextmanager
def s3_server(bucket: str | None = None, cores: set[int] | None = None):
    """A real S3 server (moto's) on loopback with `bucket` created; yields the AWS_* variables that reach it. In a
    process of its own (on `cores` when given): moto keeps its buckets per process, so two servers of one process
    would be one store."""
    import boto3

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)
    try:
        aws = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
        client = boto3.client("s3", endpoint_url=aws["AWS_ENDPOINT_URL"], region_name="us-east-1",
                              aws_access_key_id="test", aws_secret_access_key="test")
        deadline = time.time() + 60
        while True:
            try:
                client.list_buckets()
                break
            except Exception:   # not listening yet
                if time.time() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.2)
        if bucket:
            client.create_bucket(Bucket=bucket)
        yield aws
    finally:
        server.kill()
        server.wait()


@contextlib.contextmanager
def slow_uploads(aws: dict[str, str], slow_path: str, delay_s: float, first_seen: Path):
    """A proxy in front of the S3 server of `aws` that holds every upload (PUT, POST) whose path holds `slow_path`
    for `delay_s` first, as a far or busy object store does, and creates `first_seen` when the first arrives;
    yields the AWS_* variables that reach the store through it."""
    store = urlsplit(aws["AWS_ENDPOINT_URL"])

    class Forward(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                body = b""
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    body += self.rfile.read(size)
                    self.rfile.readline()
                self.rfile.readline()
                return body
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))

        def _forward(self) -> None:
            body = self._body()
            if self.command in ("PUT", "POST") and slow_path in self.path:
                first_seen.touch()
                time.sleep(delay_s)
            headers = {key: value for key, value in self.headers.items()
                       if key.lower() not in ("transfer-encoding", "content-length")}
            headers["Content-Length"] = str(len(body))
            connection = http.client.HTTPConnection(store.hostname, store.port, timeout=60)
            connection.request(self.command, self.path, body=body, headers=headers)
            answer = connection.getresponse()
            data = answer.read()
            self.send_response(answer.status)
            for key, value in answer.getheaders():
                if key.lower() not in ("transfer-encoding", "content-length", "connection"):
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            connection.close()

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        def log_message(self, *arguments) -> None:   # quiet
            pass

    proxy = ThreadingHTTPServer(("127.0.0.1", 0), Forward)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        yield {**aws, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.server_address[1]}"}
    finally:
        proxy.shutdown()
