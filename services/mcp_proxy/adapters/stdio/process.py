"""One stdio upstream process: started, spoken to over its pipes, and reaped with its tree.

A process belongs to one (user, server registration, credentials) key (adapters/stdio/
pool.py). It runs
- in its own session and process group (`start_new_session`), so one signal reaches the
  whole group, including children started by `npx`/`uvx`-style launchers;
- with a minimal environment: PATH, HOME (a directory of the user's own under the data
  dir, so npm/uv caches survive restarts without being shared between users), TMPDIR,
  LANG, plus the registration's env with the caller's secrets injected (never on argv);
- under RLIMIT_AS and RLIMIT_CPU (set in the child before exec);
- with stderr going to a bounded log file of its own (two files of at most
  `stderr_log_bytes`), and stdout read line by line with a length limit (a longer line is
  a flood and ends the process).

Reaping: SIGTERM to the group, a grace period, SIGKILL to the group. Descendants that left
the group (`setsid`) are found through their parent links (psutil), both when the process
is stopped and periodically while it runs (a grandchild whose parent already died is only
found by the periodic snapshot), and are signalled one by one. This is best effort: only
a cgroup (or a container) contains a process tree for certain.
"""

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import cast

import msgspec
import psutil

from contracts.commands.mcp import CLIENT_REQUESTS, Tool, UpstreamFeatures
from services.mcp_proxy.adapters.listing import contract_tools, decode_tool_page
from services.mcp_proxy.adapters.stdio.jsonrpc import JsonRpcPeer, RpcError
from services.mcp_proxy.adapters.stdio.launch import StderrLog, limit_resources, user_home
from services.mcp_proxy.application.ports import (
    Asked,
    CallListener,
    Reply,
    Target,
    UpstreamFailed,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from services.mcp_proxy.config import ProxySettings
from services.mcp_proxy.domain.requests import features_of

log = logging.getLogger(__name__)
_encoder = msgspec.json.Encoder()
PROTOCOL_VERSION = "2025-11-25"
# Sampling and elicitation (both modes) are relayed to the caller's MCP client when it declared
# them (adapters/asks.py); when it did not, such a request is answered -32601 during the call.
_INITIALIZE = _encoder.encode(
    {
        "protocolVersion": PROTOCOL_VERSION,
        "capabilities": {"sampling": {}, "elicitation": {"form": {}, "url": {}}},
        "clientInfo": {"name": "gatehouse", "version": "0.1.0"},
    }
)


class _Text(msgspec.Struct):
    type: str = ""
    text: str = ""


class _ResultHead(msgspec.Struct):
    isError: bool = False


class _ErrorResult(msgspec.Struct):
    content: list[_Text] = msgspec.field(default_factory=list)


class _ProgressHead(msgspec.Struct):
    progressToken: str | int | None = None


_decode_head = msgspec.json.Decoder(_ResultHead).decode
_decode_progress = msgspec.json.Decoder(_ProgressHead).decode
_decode_error_result = msgspec.json.Decoder(_ErrorResult).decode


def one_line(raw: bytes) -> bytes:
    """Raw JSON fit for one stdio line: outside strings, newlines are whitespace."""
    if b"\n" in raw or b"\r" in raw:
        return raw.replace(b"\n", b" ").replace(b"\r", b" ")
    return raw


def error_text(result: bytes) -> str:
    """The text of an isError result, shortened, for CallOutcome.error."""
    try:
        texts = [c.text for c in _decode_error_result(result).content if c.type == "text"]
    except (msgspec.DecodeError, msgspec.ValidationError):
        texts = []
    text = " ".join(texts).strip() or "The tool reported an error."
    return text if len(text) <= 1000 else text[:1000] + "…"


class StdioProcess(asyncio.SubprocessProtocol):
    def __init__(
        self,
        target: Target,
        settings: ProxySettings,
        on_end: Callable[["StdioProcess", str], None],
        on_tools_changed: Callable[[Target], None] | None = None,
    ) -> None:
        self.target, self.settings, self._on_end = target, settings, on_end
        self._on_tools_changed = on_tools_changed  # adapters/tool_changes.py
        self.pid = 0
        self.started_at = time.monotonic()
        self.last_used = self.started_at
        self.in_flight = 0
        self.retired: str | None = None  # why it takes no new calls
        self.exit_code: int | None = None
        self.known_descendants: dict[int, float] = {}  # pid -> create_time
        self._tools: list[Tool] | None = None
        self.features = UpstreamFeatures()  # from its initialize result
        self._transport: asyncio.SubprocessTransport | None = None
        self._stdin: asyncio.WriteTransport | None = None
        self._exited = asyncio.Event()
        self._stopping: asyncio.Task[None] | None = None
        self._calls: dict[str, int] = {}  # call id -> JSON-RPC id, for cancel
        self._listeners: dict[str, CallListener] = {}  # call id (also its progress token upstream)
        self.peer = JsonRpcPeer(
            self._write,
            settings.max_message_bytes,
            self._fatal,
            self._notified,
            label=f"upstream '{target.server}'",
            on_request=self._requested,
        )
        self._relaying: set[asyncio.Task[None]] = set()  # upstream requests out to a client
        logs = settings.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        name = f"{target.server}-{hashlib.sha256(target.user_id.encode()).hexdigest()[:8]}-{id(self):x}.log"
        self.stderr = StderrLog(logs / name, settings.stderr_log_bytes)

    # -- asyncio protocol ------------------------------------------------------------------
    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if fd == 1:
            self.peer.feed(data)
        else:
            self.stderr.write(data)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if fd == 1:
            self._lost("closed its stdout")

    def process_exited(self) -> None:
        assert self._transport is not None
        self.exit_code = self._transport.get_returncode()
        self._exited.set()
        self._lost(f"exited with code {self.exit_code}")

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        t = self.target
        assert t.command is not None
        home = user_home(self.settings.data_dir, t.user_id)
        env = {
            "PATH": self.settings.path,
            "HOME": str(home),
            "TMPDIR": str(home / "tmp"),
            "LANG": "C.UTF-8",
            **t.env,
        }
        limits = (self.settings.memory_limit_mb * 1024 * 1024, self.settings.cpu_limit_s)
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.subprocess_exec(
                lambda: self,
                t.command,
                *t.args,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                cwd=str(home),
                start_new_session=True,
                preexec_fn=lambda: limit_resources(*limits),
            )
        except OSError as err:
            self.stderr.close(remove=True)
            raise UpstreamUnavailable(
                f"The server '{t.server}' could not be started: {t.command}: {err.strerror or err}."
            ) from None
        self._transport = transport
        self.pid = transport.get_pid()
        self._stdin = cast(asyncio.WriteTransport, transport.get_pipe_transport(0))  # uvloop's is no subclass
        try:
            initialized = await self.peer.request("initialize", _INITIALIZE, self.settings.start_timeout_s)
            self.features = features_of(initialized)
            self.peer.notify("notifications/initialized")
            await self.tools(refresh=True)
        except (TimeoutError, RpcError, UpstreamFailed) as err:
            await self.stop("start failed")  # first: then its exit code and last words are known
            raise UpstreamUnavailable(self._start_failure(err)) from None
        except BaseException:  # canceled (shutdown): never leave a half-started process behind
            await asyncio.shield(self.stop("start failed"))
            raise

    def _start_failure(self, err: Exception) -> str:
        server = self.target.server
        if isinstance(err, TimeoutError):
            what = f"did not answer initialize within {self.settings.start_timeout_s:g} s"
        elif isinstance(err, RpcError):
            what = f"refused initialize ({err.code}: {err.message})"
        elif self.exit_code is not None:
            what = f"exited with code {self.exit_code} before it was ready"
        else:
            what = str(err)
        words = self.stderr.last_words()
        return f"The server '{server}' could not be started: it {what}." + (
            f" stderr: {words}" if words else ""
        )

    @property
    def usable(self) -> bool:
        return self.retired is None and self.peer.closed is None

    def retire(self, reason: str) -> None:
        """Takes no new calls; stops as soon as its calls in flight have ended."""
        if self.retired is None:
            self.retired = reason
        if self.in_flight == 0:
            self.stop(reason)

    def stop(self, reason: str) -> "asyncio.Task[None]":
        if self._stopping is None:
            self.retired = self.retired or reason
            self._stopping = asyncio.get_running_loop().create_task(self.terminate(reason))
        return self._stopping

    async def terminate(self, reason: str) -> None:
        """Signals the whole tree (group, then strays) and waits for the process to end."""
        self.retired = self.retired or reason
        strays = self._descendants()
        self._signal_tree(signal.SIGTERM, strays)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.kill_grace_s):
                await self._exited.wait()
        self._signal_tree(signal.SIGKILL, strays)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await self._exited.wait()
        self.peer.close(f"The upstream '{self.target.server}' was stopped ({reason}).")
        if self._transport is not None:
            self._transport.close()
        self.stderr.close(remove=reason not in ("crashed", "flood", "protocol", "start failed"))
        self._on_end(self, reason)

    def _descendants(self) -> list[psutil.Process]:
        found: dict[int, psutil.Process] = {}
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.pid).children(recursive=True):
                found[child.pid] = child
        for pid, created in list(self.known_descendants.items()):
            if pid in found:
                continue
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == created:
                    found[pid] = proc
            except psutil.Error:
                self.known_descendants.pop(pid, None)
        return list(found.values())

    def _signal_tree(self, sig: signal.Signals, strays: list[psutil.Process]) -> None:
        if self.pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)
        for proc in strays:
            with contextlib.suppress(psutil.Error, OSError):
                if os.getpgid(proc.pid) != self.pid:  # the group signal did not reach it
                    proc.send_signal(sig)

    def _lost(self, what: str) -> None:
        if self.peer.closed is None:
            words = self.stderr.last_words()
            self.peer.close(
                f"The upstream '{self.target.server}' {what} during the call."
                + (f" stderr: {words}" if words else "")
            )
        if self._stopping is None and self.retired is None:
            self.stop("crashed")  # also takes its group and strays down with it

    def _fatal(self, why: str) -> None:
        self.retired = why
        self.stop(why)

    def _notified(self, method: str, params: bytes) -> None:
        if method == "notifications/tools/list_changed":
            self._tools = None
            if self._on_tools_changed is not None:
                self._on_tools_changed(self.target)
        elif not self._listeners:
            return
        elif method == "notifications/progress":
            try:
                token = _decode_progress(params).progressToken
            except (msgspec.DecodeError, msgspec.ValidationError):
                return
            listener = self._listeners.get(token) if isinstance(token, str) else None
            if listener is not None:
                listener.progress(params)
        elif method == "notifications/message":
            # stdio cannot say which request a log line belongs to: every call of this user's
            # process that asked for logs gets it
            for listener in self._listeners.values():
                if listener.wants_logs:
                    listener.log(params)

    def _requested(self, rid: int | str, method: str, params: bytes) -> bool:
        """Sampling or elicitation during a call whose client declared it: relayed to that client.

        stdio cannot say which call a request belongs to: it goes to the oldest call in flight
        whose client accepts it (every call of this process is the same user's).
        """
        if method not in CLIENT_REQUESTS or memoryview(params)[:1] != b"{":
            return False
        listener = next((lis for lis in self._listeners.values() if lis.accepts(method, params)), None)
        if listener is None:
            return False
        task = asyncio.get_running_loop().create_task(self._relay(rid, method, params, listener))
        self._relaying.add(task)
        task.add_done_callback(self._relaying.discard)
        return True

    async def _relay(self, rid: int | str, method: str, params: bytes, listener: CallListener) -> None:
        try:
            asked = await listener.ask(method, params)
        except Exception as err:  # the bus failed: the upstream still gets an answer
            log.info("could not relay %s to the client: %s", method, type(err).__name__)
            asked = Asked(code=-32603, message="The request could not be relayed to the client.")
        try:
            if asked.result is not None:
                self.peer.respond(rid, one_line(asked.result))
            else:
                self.peer.respond_error(rid, asked.code, asked.message, asked.data and one_line(asked.data))
        except UpstreamFailed:
            pass  # the process is gone: nobody waits for the answer

    def _write(self, line: bytes) -> None:
        stdin = self._stdin
        if stdin is None or stdin.is_closing():
            raise UpstreamFailed(f"The upstream '{self.target.server}' is not running.")
        stdin.write(line)

    # -- MCP -------------------------------------------------------------------------------
    async def tools(self, refresh: bool = False) -> list[Tool]:
        if self._tools is not None and not refresh:
            return self._tools
        tools: list[Tool] = []
        cursor: str | None = None
        for _ in range(50):
            params = _encoder.encode({"cursor": cursor}) if cursor else None
            raw = await self.peer.request("tools/list", params, self.settings.start_timeout_s)
            try:
                page = decode_tool_page(raw)
            except (msgspec.DecodeError, msgspec.ValidationError) as err:
                raise UpstreamFailed(
                    f"The upstream '{self.target.server}' sent a tools/list result that is not valid: {err}"
                ) from None
            tools += contract_tools(page)
            cursor = page.nextCursor
            if not cursor:
                break
        self._tools = tools
        return tools

    async def call(
        self, tool: str, arguments: bytes, timeout: float, call_id: str, listener: CallListener | None = None
    ) -> Reply:
        self.in_flight += 1
        self.last_used = time.monotonic()
        params = b'{"name":' + _encoder.encode(tool) + b',"arguments":' + one_line(arguments)
        if listener is not None:
            self._listeners[call_id] = listener
            if listener.wants_progress:  # our token upstream; the listener puts the client's back
                params += b',"_meta":{"progressToken":' + _encoder.encode(call_id) + b"}"
        params += b"}"
        try:
            then = "the call was canceled and the upstream process restarted"
            result = await self._exchange("tools/call", params, timeout, then, call_id)
        except RpcError as err:
            return Reply(None, error=err.message, error_code=err.code)
        finally:
            self._calls.pop(call_id, None)
            if listener is not None:
                self._listeners.pop(call_id, None)
                await listener.flush()  # every notification is out before the outcome
            self._finished()
        if _decode_head(result).isError:
            return Reply(result, is_error=True, error=error_text(result), size=len(result))
        return Reply(result, size=len(result))

    async def request(self, method: str, params: bytes, timeout: float) -> Reply:
        """Any other request (resources, prompts, completions): params and result stay raw."""
        self.in_flight += 1
        self.last_used = time.monotonic()
        try:
            then = "the upstream process is restarted"
            result = await self._exchange(method, one_line(params), timeout, then)
        except RpcError as err:
            return Reply(None, error=err.message, error_code=err.code, error_data=err.data)
        finally:
            self._finished()
        return Reply(result, size=len(result))

    async def _exchange(
        self, method: str, params: bytes, timeout: float, then: str, call_id: str | None = None
    ) -> msgspec.Raw:
        """Sends one request and waits for its result (RpcError: the upstream's error); an
        upstream that does not answer in time is retired and never used again."""
        rid = 0
        try:
            rid, fut = self.peer.send(method, params)
            if call_id is not None:
                self._calls[call_id] = rid  # so that the client can cancel it
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            self.peer.abandon(rid, "timeout")
            self.retire("timeout")
            what = "" if method == "tools/call" else f"{method} "
            raise UpstreamTimeout(
                f"The server '{self.target.server}' did not answer {what}within {timeout:g} s; {then}."
            ) from None

    def _finished(self) -> None:
        """One request fewer in flight; a retired process stops once the last one is done."""
        self.in_flight -= 1
        self.last_used = time.monotonic()
        if self.retired is not None and self.in_flight == 0:
            self.stop(self.retired)

    def cancel(self, call_id: str) -> bool:
        rid = self._calls.get(call_id)
        return rid is not None and self.peer.cancel(rid, "canceled by the client")
