"""How a stdio upstream is launched: its HOME, its resource limits, its stderr log."""

import contextlib
import hashlib
import os
import resource
from collections import deque
from pathlib import Path

from services.kit.redaction import redact


def user_home(data_dir: Path, user_id: str) -> Path:
    home = data_dir / "homes" / hashlib.sha256(user_id.encode()).hexdigest()[:16]
    (home / "tmp").mkdir(parents=True, exist_ok=True, mode=0o700)
    return home


def limit_resources(memory_bytes: int, cpu_s: int) -> None:  # runs in the child, before exec
    if memory_bytes > 0:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    if cpu_s > 0:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 5))


class StderrLog:
    """The upstream's stderr: at most two files of `cap` bytes, and the last lines in memory."""

    def __init__(self, path: Path, cap: int) -> None:
        self.path, self.cap = path, max(cap, 4096)
        self.tail: deque[bytes] = deque(maxlen=20)
        self._file = open(path, "ab", buffering=0)
        self._size = 0

    def write(self, data: bytes) -> None:
        self.tail.append(data[-2000:])
        if self._size + len(data) > self.cap:
            self._file.close()
            os.replace(self.path, self.path.with_suffix(".log.1"))
            self._file = open(self.path, "ab", buffering=0)
            self._size = 0
        self._file.write(data[: self.cap])
        self._size += min(len(data), self.cap)

    def last_words(self) -> str:
        text = b"".join(self.tail).decode(errors="replace").strip().splitlines()
        return redact(" | ".join(text[-3:]))[-600:] if text else ""

    def close(self, remove: bool) -> None:
        self._file.close()
        if remove:
            for p in (self.path, self.path.with_suffix(".log.1")):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
