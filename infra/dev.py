#!/usr/bin/env python3
"""The two quick-start commands, on a machine with nothing but Python 3.11+ and pip.

    python3 infra/dev.py up [gatehouse up arguments...]
    python3 infra/dev.py test [pytest arguments...]

Both make `.venv` in the repository root when it is missing and install the project into
it with `pip install -e '.[test]'`; the install is repeated when pyproject.toml changes (a
hash of it is kept in `.venv`). `up` then becomes `.venv/bin/gatehouse up ...`; `test` runs
ruff check, ruff format --check, mypy and pytest, in that order, and stops at the first
step that fails, naming it. Standard library only; no prompts, so it runs under CI.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".gatehouse-install"
MIN_PYTHON = (3, 11)


def say(line: str) -> None:
    print(f"dev.py: {line}", flush=True)


def fail(line: str, code: int = 1) -> SystemExit:
    print(f"dev.py: {line}", file=sys.stderr, flush=True)
    return SystemExit(code)


def tool(name: str) -> str:
    return str(BIN / name)


def child_env() -> dict[str, str]:
    """The environment of the venv's tools: its bin first on PATH (nats-server lives there)."""
    env = dict(os.environ)
    env["VIRTUAL_ENV"] = str(VENV)
    env["PATH"] = str(BIN) + os.pathsep + env.get("PATH", "")
    env.pop("PYTHONHOME", None)
    env.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    return env


def install_fingerprint() -> str:
    h = hashlib.sha256((ROOT / "pyproject.toml").read_bytes())
    h.update(f"{sys.version_info[:2]}".encode())
    return h.hexdigest()


def venv_works() -> bool:
    python = BIN / "python"
    if not python.exists():
        return False
    probe = subprocess.run(
        [str(python), "-c", "import sys"], stdin=subprocess.DEVNULL, capture_output=True, check=False
    )
    return probe.returncode == 0


def ensure_venv() -> None:
    if not venv_works():
        if VENV.exists():
            say(f"{VENV} is broken; making it again")
            shutil.rmtree(VENV)
        say(f"creating {VENV} with Python {sys.version.split()[0]}")
        try:
            venv.EnvBuilder(with_pip=True, upgrade_deps=False).create(VENV)
        except (OSError, subprocess.CalledProcessError) as err:
            raise fail(
                f"could not create the virtual environment ({err}); on Debian/Ubuntu install "
                "the `python3-venv` package and try again"
            ) from None
    fingerprint = install_fingerprint()
    if STAMP.exists() and STAMP.read_text().strip() == fingerprint and (BIN / "gatehouse").exists():
        return
    first = not STAMP.exists()
    say("installing the project into .venv (pip install -e '.[test]')" + (", a few minutes" if first else ""))
    started = time.monotonic()
    result = subprocess.run(
        [tool("python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-e", ".[test]"],
        cwd=ROOT,
        env=child_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        check=False,
    )
    if result.returncode != 0:
        sys.stderr.write(result.stdout.decode(errors="replace"))
        STAMP.unlink(missing_ok=True)
        raise fail(f"pip install failed (exit {result.returncode}); its output is above")
    STAMP.write_text(fingerprint + "\n")
    say(f"installed in {time.monotonic() - started:.0f}s")


def run_steps(pytest_args: list[str]) -> int:
    steps = [
        ("ruff check", [tool("ruff"), "check", "."]),
        ("ruff format --check", [tool("ruff"), "format", "--check", "."]),
        ("mypy", [tool("mypy")]),
        ("pytest", [tool("pytest"), *pytest_args]),
    ]
    env = child_env()
    for name, argv in steps:
        say(f"step {name}")
        started = time.monotonic()
        code = subprocess.run(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, check=False).returncode
        took = time.monotonic() - started
        if code != 0:
            why = " (no tests were collected)" if name == "pytest" and code == 5 else ""
            print(f"dev.py: step `{name}` failed (exit code {code}{why}, {took:.1f}s)", file=sys.stderr)
            return code
        say(f"step {name} passed in {took:.1f}s")
    say("all steps passed")
    return 0


USAGE = """usage: python3 infra/dev.py up [gatehouse up args...]
       python3 infra/dev.py test [pytest args...]"""


def main(argv: list[str]) -> int:
    if sys.version_info < MIN_PYTHON:
        raise fail(f"Python {'.'.join(map(str, MIN_PYTHON))}+ is needed; this is {sys.version.split()[0]}")
    if not argv or argv[0] not in ("up", "test"):
        print(USAGE, file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    ensure_venv()
    if command == "up":
        gatehouse = tool("gatehouse")
        os.execve(gatehouse, [gatehouse, "up", *rest], child_env())  # noqa: S606 - our own venv's script
    return run_steps(rest)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
