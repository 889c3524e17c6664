"""How a step and a build ended, in the words the API shows."""

import signal
from typing import Literal

Trouble = Literal["canceled", "lost", "step_timeout", "build_timeout", "output", "memory"]
StepStatus = Literal["completed", "failed", "canceled"]


def exit_code_of(returncode: int) -> int:
    """A process killed by signal N reports 128 + N, as a shell would."""
    return 128 - returncode if returncode < 0 else returncode


def _signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def step_outcome(
    index: int, returncode: int, trouble: Trouble | None, limit_text: str = ""
) -> tuple[StepStatus, str | None]:
    """(status, error) of step `index` (0-based) from its exit status and what stopped it."""
    step = f"step {index + 1}"
    if trouble in ("canceled", "lost"):
        return "canceled", None
    if trouble == "step_timeout":
        return "failed", f"{step} exceeded its time limit of {limit_text}"
    if trouble == "build_timeout":
        return "failed", f"the build exceeded its time limit of {limit_text}"
    if trouble == "output":
        return "failed", f"the build's output exceeded the limit of {limit_text}"
    if trouble == "memory":
        return "failed", f"{step} exceeded the memory limit of {limit_text}"
    if returncode == 0:
        return "completed", None
    if returncode < 0:
        return "failed", f"{step} was killed by {_signal_name(returncode)}"
    return "failed", f"{step} failed with exit code {returncode}"


def launch_failure(index: int, command: str, node: str, err: OSError) -> tuple[int, str]:
    """(exit code, error) when the agent command could not be started at all."""
    if isinstance(err, FileNotFoundError):
        return 127, (
            f"the agent command `{command}` was not found on node {node} "
            "(install it there, or set GATEHOUSE_AGENT_COMMAND)"
        )
    if isinstance(err, PermissionError):
        return 126, f"the agent command `{command}` is not executable on node {node}"
    return 126, f"step {index + 1} could not start `{command}` on node {node}: {err.strerror or err}"


def megabytes(n: int) -> str:
    return f"{n} MB"


def byte_size(n: int) -> str:
    if n >= 1024 * 1024 and n % (1024 * 1024) == 0:
        return f"{n // (1024 * 1024)} MiB"
    return f"{n} bytes"
