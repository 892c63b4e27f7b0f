"""A real S3-compatible HTTP endpoint for tests and benchmarks: moto's server app, in its own process.

The app is moto's own WSGI application served by werkzeug on 127.0.0.1 (what ``moto_server``
runs), wrapped in a middleware that counts the response bytes per bucket, so tests can measure
exactly what a reader fetched. ``GET /_tallstore/counts`` returns the counts; ``POST
/_tallstore/reset`` clears them; ``POST /_tallstore/latency?ms=N`` adds a fixed delay to every
request, to mimic an object store's first-byte latency in benchmarks.

Run by hand: ``python tests/s3server.py --port 5555``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

COUNTS = "/_tallstore/counts"
RESET = "/_tallstore/reset"
LATENCY = "/_tallstore/latency"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class Counting:
    """WSGI middleware counting per bucket: requests by method, GET bytes (per key too), most in flight."""

    def __init__(self, app: Callable[..., Iterable[bytes]], latency_s: float = 0.0) -> None:
        self.app = app
        self.latency_s = latency_s
        self.counts: dict[str, dict[str, Any]] = {}
        self.in_flight: dict[str, int] = {}
        self.lock = threading.Lock()

    def _add(self, bucket: str, field: str, n: int, key: str | None = None) -> None:
        with self.lock:
            c = self.counts.setdefault(bucket, {})
            c[field] = c.get(field, 0) + n
            if key is not None:
                keys = c.setdefault("keys", {})
                keys[key] = keys.get(key, 0) + n

    def _enter(self, bucket: str) -> None:
        with self.lock:
            now = self.in_flight[bucket] = self.in_flight.get(bucket, 0) + 1
            c = self.counts.setdefault(bucket, {})
            c["max_in_flight"] = max(c.get("max_in_flight", 0), now)

    def _leave(self, bucket: str) -> None:
        with self.lock:
            self.in_flight[bucket] -= 1

    def _json(self, start_response: Callable[..., Any], obj: Any) -> list[bytes]:
        body = json.dumps(obj).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == COUNTS:
            with self.lock:
                return self._json(start_response, self.counts)
        if path == RESET:
            with self.lock:
                self.counts = {}
            return self._json(start_response, {})
        if path == LATENCY:
            self.latency_s = float(parse_qs(environ.get("QUERY_STRING", "")).get("ms", ["0"])[0]) / 1000
            return self._json(start_response, {})
        method = environ.get("REQUEST_METHOD", "GET")
        bucket, _, key = path.lstrip("/").partition("/")
        self._add(bucket, method, 1)
        self._enter(bucket)
        try:
            if self.latency_s:
                time.sleep(self.latency_s)
            body = self.app(environ, start_response)
        except BaseException:
            self._leave(bucket)
            raise
        return self._stream(bucket, key if method == "GET" and key else None, body)

    def _stream(self, bucket: str, key: str | None, body: Iterable[bytes]) -> Iterator[bytes]:
        """Count the body's bytes; the request stops counting as in flight before its last byte is
        handed over, so a client that starts a new request once it has the whole body is never
        seen overlapping this one."""
        left = False
        try:
            pieces = list(body)
            for i, piece in enumerate(pieces):
                if key is not None:
                    self._add(bucket, "bytes", len(piece), key)
                if i == len(pieces) - 1:
                    self._leave(bucket)
                    left = True
                yield piece
        finally:
            if not left:
                self._leave(bucket)
            close = getattr(body, "close", None)
            if close is not None:
                close()


def serve(port: int, latency_ms: float) -> None:
    """Serve moto's app on 127.0.0.1:``port`` (0: any free port); print the port, then serve."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    app = Counting(DomainDispatcherApplication(create_backend_app), latency_ms / 1000)
    server = make_server("127.0.0.1", port, app, threaded=True, request_handler=MotoRequestHandler)
    print(server.server_address[1], flush=True)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # nobody reads on: never block on a full pipe
    server.serve_forever()


class S3Server:
    """A moto S3 server process on a free 127.0.0.1 port; use as a context manager."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None
        self.endpoint = ""

    def __enter__(self) -> S3Server:
        env = {**os.environ, **CREDENTIALS}
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--port", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.isdigit():
            self.__exit__()
            raise RuntimeError("the moto S3 server did not start (is moto[server] installed?)")
        self.endpoint = f"http://127.0.0.1:{line}"
        deadline = time.monotonic() + 30
        while True:
            try:
                self.counts()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.__exit__()
                    raise
                time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    @property
    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs options that reach this server."""
        return {
            "key": CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "secret": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            "endpoint_url": self.endpoint,
            "client_kwargs": {"region_name": CREDENTIALS["AWS_DEFAULT_REGION"]},
        }

    @property
    def env(self) -> dict[str, str]:
        """The usual AWS environment variables that reach this server."""
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint}

    def counts(self) -> dict[str, dict[str, Any]]:
        """Per bucket since the last reset: requests by method, GET bytes, and GET bytes per key."""
        with urllib.request.urlopen(self.endpoint + COUNTS, timeout=5) as r:
            return json.loads(r.read())

    def fetched(self, bucket: str) -> int:
        """GET response bytes served from ``bucket`` since the last reset."""
        return self.counts().get(bucket, {}).get("bytes", 0)

    def max_in_flight(self, bucket: str) -> int:
        """The most requests to ``bucket`` served at once since the last reset."""
        return self.counts().get(bucket, {}).get("max_in_flight", 0)

    def fetched_keys(self, bucket: str) -> dict[str, int]:
        """GET response bytes per object key of ``bucket`` since the last reset."""
        return self.counts().get(bucket, {}).get("keys", {})

    def reset(self) -> None:
        """Clear the counts."""
        self._post(RESET)

    def set_latency(self, ms: float) -> None:
        """Delay every later request by ``ms`` milliseconds."""
        self._post(f"{LATENCY}?ms={ms}")

    def _post(self, path: str) -> None:
        req = urllib.request.Request(self.endpoint + path, method="POST")
        with urllib.request.urlopen(req, timeout=5):
            pass

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` and return its ``s3://`` URL."""
        import boto3

        boto3.client(
            "s3", endpoint_url=self.endpoint, region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"], aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        ).create_bucket(Bucket=name)
        return f"s3://{name}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    args = parser.parse_args()
    serve(args.port, args.latency_ms)
