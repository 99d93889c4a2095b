"""The progress of registry transfers: rich's live bar on a terminal, lines otherwise."""

from __future__ import annotations

import io
import re
import threading

from snapbuild.exec.report import NullTransfer, PlainTransfer, RichTransfer, make_transfer_display


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def feed(display, verb: str, blobs: int, size: int) -> None:
    workers = [threading.Thread(target=display, args=(verb, blobs, size)) for _ in range(blobs)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def test_auto_picks_the_bar_on_a_terminal_and_lines_elsewhere():
    assert isinstance(make_transfer_display("auto", Terminal()), RichTransfer)
    assert type(make_transfer_display("auto", io.StringIO())) is PlainTransfer
    assert isinstance(make_transfer_display("none", Terminal()), NullTransfer)


def test_the_bar_counts_blobs_and_bytes_per_verb():
    out = Terminal()
    d = make_transfer_display("tty", out)
    feed(d, "fetched", 4, 1 << 20)  # from worker threads, as the transfer calls it
    feed(d, "sent", 2, 1 << 19)
    d.close()
    raw = out.getvalue()
    assert "\x1b[?25l" in raw and "\x1b[2K" in raw, "drawn live (cursor hidden, lines redrawn)"
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw)
    assert "fetched" in text and "4/4 blobs 4.0 MiB" in text, text
    assert "sent" in text and "2/2 blobs 1.0 MiB" in text, text


def test_plain_lines_at_most_every_interval_and_the_last():
    out = io.StringIO()
    d = PlainTransfer(out, every=3600)
    feed(d, "sent", 5, 1 << 20)
    assert out.getvalue() == "sent 5/5 blobs, 5.0 MiB\n"
    n = NullTransfer(out)
    n("sent", 1, 1)
    assert out.getvalue() == "sent 5/5 blobs, 5.0 MiB\n"
