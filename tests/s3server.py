"""A real S3 API server for tests: moto in server mode, in its own process on loopback.

Owns starting moto on 127.0.0.1 with a free port, waiting until it answers, switching its
IAM enforcement on and off, and stopping it by PID. Never binds anything but loopback.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from types import TracebackType

from integration.cluster import free_port

__all__ = ["MotoServer"]

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


class MotoServer:
    """`with MotoServer() as s3:` runs `python -m moto.server` until the block ends.

    `endpoint` is the URL to give boto3. Any credentials are accepted until
    `enforce_auth()`; then requests are checked against moto's IAM users and policies.
    """

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.host = "127.0.0.1"
        self.port = 0
        self._env = env or {}
        self._proc: subprocess.Popen[bytes] | None = None
        # The server logs every request; a pipe nobody drains would stall it, so the log
        # goes to a file that is shown only when the server fails to start.
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - outlives this call; stop() closes it

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        self.port = free_port()
        env = {**os.environ, **self._env}
        # The server itself must not pick up the caller's AWS settings.
        for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
            env.pop(name, None)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._proc.poll() is not None:
                code, tail = self._proc.returncode, self._tail()
                self.stop()
                raise RuntimeError(f"moto server exited with {code}:\n{tail}")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/data.json", timeout=2):
                    return
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    tail = self._tail()
                    self.stop()
                    raise RuntimeError(
                        f"moto server did not answer within {START_TIMEOUT}s:\n{tail}"
                    ) from None
                time.sleep(0.1)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        self._log.close()

    def enforce_auth(self, enabled: bool = True) -> None:
        """Check every following request against moto's IAM (or stop checking)."""
        count = "0" if enabled else "inf"
        self._post("/moto-api/reset-auth", count.encode())

    def reset(self) -> None:
        """Forget every bucket, user and policy."""
        self._post("/moto-api/reset", b"")

    def _post(self, path: str, data: bytes) -> None:
        # Not form-encoded (urllib's default): Flask would parse the body away as a form.
        req = urllib.request.Request(
            f"{self.endpoint}{path}",
            data=data,
            method="POST",
            headers={"Content-Type": "application/octet-stream"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()

    def _tail(self) -> str:
        self._log.seek(0)
        return self._log.read()[-4000:].decode(errors="replace")

    def __enter__(self) -> MotoServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
