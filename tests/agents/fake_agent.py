#!/usr/bin/env python3
"""A stand-in for an agent CLI such as `cursor-agent -p --output-format stream-json`.

It reads its key from CURSOR_API_KEY and reports its sha256, then prints stream-JSON lines
about the prompt (the last argument, or stdin when there is none). Words in the prompt
steer it:

    sleep:S            sleep S seconds (fractions allowed)
    fail:N             exit with code N
    flood:N            print N bytes of output (lines of 100 characters)
    ignore-term        ignore SIGTERM (only SIGKILL stops it)
    grandchild         start a sleeping grandchild in the same process group
    grandchild-setsid  start a sleeping grandchild that leaves the group (setsid)
    leak               print the key itself, on stdout and stderr
    stderr:TEXT        print TEXT on stderr
    alloc:MB           hold MB megabytes of memory
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time


def say(kind: str, **fields: object) -> None:
    print(json.dumps({"type": kind, **fields}), flush=True)


def main() -> int:
    prompt = sys.argv[-1] if len(sys.argv) > 1 else sys.stdin.read()
    key = os.environ.get("CURSOR_API_KEY", "")
    say("system", subtype="init", cwd=os.getcwd(), pid=os.getpid(), pgid=os.getpgid(0), t=time.time())
    say("key", sha256=hashlib.sha256(key.encode()).hexdigest() if key else None)
    say("assistant", text=f"prompt: {prompt}")
    held = []
    code = 0
    for word in prompt.split():
        name, _, arg = word.partition(":")
        if name == "sleep":
            time.sleep(float(arg))
        elif name == "fail":
            code = int(arg)
        elif name == "flood":
            line = "x" * 99
            for _ in range(int(arg) // 100):
                print(line)
            sys.stdout.flush()
        elif name == "ignore-term":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            say("assistant", text="ignoring SIGTERM")
        elif name in ("grandchild", "grandchild-setsid"):
            child = subprocess.Popen(
                [sys.executable, "-c", "import time; time.sleep(600)"],
                start_new_session=name == "grandchild-setsid",
            )
            say("grandchild", pid=child.pid)
        elif name == "leak":
            print(f"my key is {key}", flush=True)
            print(f"the key again: {key}!", file=sys.stderr, flush=True)
        elif name == "stderr":
            print(arg, file=sys.stderr, flush=True)
        elif name == "alloc":
            held.append(bytearray(int(arg) * 1024 * 1024))
            say("assistant", text=f"holding {arg} MB")
            time.sleep(3)
    say("result", subtype="success" if code == 0 else "error", is_error=code != 0, exit_code=code)
    return code


if __name__ == "__main__":
    sys.exit(main())
