"""Turns an agent's output bytes into redacted text lines, whatever the chunking.

Output arrives in arbitrary chunks: a line, or a secret inside it, may be cut anywhere.
Bytes are decoded incrementally (a multi-byte character cut in two is joined again) and
lines are redacted whole. A line longer than `max_line` is cut, but only after redacting
all of what is buffered and holding back the last `keep` characters, so a secret shorter
than `keep` that straddles the cut is still whole when it is matched.
"""

import codecs
from collections.abc import Callable


class LineSplitter:
    def __init__(self, redact: Callable[[str], str], max_line: int = 16 * 1024, keep: int = 1024) -> None:
        if keep >= max_line:
            raise ValueError("keep must be smaller than max_line")
        self.redact, self.max_line, self.keep = redact, max_line, keep
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text = ""

    def feed(self, data: bytes) -> list[str]:
        self._text += self._decoder.decode(data)
        out: list[str] = []
        if "\n" in self._text:
            *complete, self._text = self._text.split("\n")
            out.extend(self.redact(line.removesuffix("\r")) for line in complete)
        while len(self._text) > self.max_line:
            redacted = self.redact(self._text)
            cut = max(len(redacted) - self.keep, 1)
            out.append(redacted[:cut])
            self._text = redacted[cut:]
        return out

    def flush(self) -> list[str]:
        """What is left at the end of the stream (a last line without a newline)."""
        self._text += self._decoder.decode(b"", final=True)
        rest, self._text = self._text, ""
        return [self.redact(rest.removesuffix("\r"))] if rest else []
