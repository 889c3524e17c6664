"""The gateway's corked transport: one write per loop turn, nothing lost at close."""

import asyncio

import pytest

from services.gateway.adapters.http.corked import CorkedTransport

pytestmark = pytest.mark.unit


class Recording(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"peername": ("127.0.0.1", 4242)}.get(name, default)


async def test_the_writes_of_one_turn_leave_in_one_write() -> None:
    real = Recording()
    corked = CorkedTransport(real, asyncio.get_running_loop())
    corked.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    corked.write(b"{}")
    assert real.writes == []
    await asyncio.sleep(0)
    assert real.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]


async def test_writes_in_later_turns_leave_one_by_one() -> None:
    real = Recording()
    corked = CorkedTransport(real, asyncio.get_running_loop())
    for event in (b"data: 1\n\n", b"data: 2\n\n"):
        corked.write(event)
        await asyncio.sleep(0)
    assert real.writes == [b"data: 1\n\n", b"data: 2\n\n"]


async def test_a_close_sends_what_was_written_first() -> None:
    real = Recording()
    corked = CorkedTransport(real, asyncio.get_running_loop())
    corked.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    assert corked.get_write_buffer_size() == len(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    corked.close()
    assert real.writes == [b"HTTP/1.1 400 Bad Request\r\n\r\n"] and real.closed
    await asyncio.sleep(0)  # the scheduled flush finds nothing more to send
    assert real.writes == [b"HTTP/1.1 400 Bad Request\r\n\r\n"]
    assert corked.get_extra_info("peername") == ("127.0.0.1", 4242) and corked.is_closing()
