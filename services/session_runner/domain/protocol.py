"""What a runner node and its worker processes say to each other over the worker's pipes.

The runner writes the `WorkerSpec` as one JSON line on the worker's stdin (the agent key is
never in it: it is in the worker's environment), then at most the line `stop`. Closing the
pipe (the runner died) is a stop too. The worker writes one JSON report per line on its
stdout: `began` (a step's agent started), `lines` (a batch of redacted output lines),
`done` (a step ended), `tick` (alive, every `tick_s`), and last `end`.
"""

from datetime import datetime
from typing import Literal

import msgspec

from contracts.commands.builds import LogLine, StepView

PromptMode = Literal["arg", "stdin"]
STOP = b"stop\n"


class Limits(msgspec.Struct, kw_only=True, frozen=True):
    step_timeout_s: float = 1800.0
    build_timeout_s: float = 3600.0
    max_output_bytes: int = 64 * 1024 * 1024  # stdout + stderr of all steps
    memory_mb: int = 2048  # resident memory of the agent's whole process tree; 0: no limit
    address_space_mb: int = 0  # RLIMIT_AS of each agent process; 0: none (node reserves a lot)
    kill_grace_s: float = 5.0  # SIGTERM to the process group, then SIGKILL after this


class WorkerSpec(msgspec.Struct, kw_only=True, frozen=True):
    build_id: str
    node: str
    prompts: list[str]
    command: list[str]  # the agent CLI and its fixed arguments
    prompt_mode: PromptMode
    key_env: str  # the variable holding the agent key in the worker's (and agent's) environment
    workdir: str
    out_log: str
    err_log: str
    limits: Limits
    tick_s: float = 2.0


class Began(msgspec.Struct, tag="began", kw_only=True):
    index: int
    pid: int  # the agent's pid, also its process group id


class Lines(msgspec.Struct, tag="lines", kw_only=True):
    lines: list[LogLine]


class Done(msgspec.Struct, tag="done", kw_only=True):
    step: StepView


class Tick(msgspec.Struct, tag="tick"):
    pass


class End(msgspec.Struct, tag="end", kw_only=True):
    status: Literal["completed", "failed", "canceled"]
    exit_code: int | None
    error: str | None
    log_lines: int
    finished_at: datetime


Report = Began | Lines | Done | Tick | End

_encoder = msgspec.json.Encoder()
_report_decoder = msgspec.json.Decoder(Report)
_spec_decoder = msgspec.json.Decoder(WorkerSpec)


def encode_line(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message) + b"\n"


def decode_report(line: bytes) -> Report:
    report: Report = _report_decoder.decode(line)
    return report


def decode_spec(line: bytes) -> WorkerSpec:
    return _spec_decoder.decode(line)
