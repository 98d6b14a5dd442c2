"""The remote-event wire format (events.py): round trips and malformed input."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from notifyfs import abi, events
from notifyfs.protocol import Attr, ProtocolError, decode_reply, decode_request

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
names = st.binary(min_size=0, max_size=255).filter(lambda b: b"\0" not in b and b"/" not in b)


@st.composite
def entries(draw):  # type: ignore[no-untyped-def]
    attr = Attr(*[draw(u64) for _ in range(6)], *[draw(u32) for _ in range(10)])
    return events.make_entry(draw(u64), draw(u32), attr, 1.5, 0.25)


@settings(max_examples=300, deadline=None)
@given(inode=u64, gen=u64, mask=u64, cookie=u32, name=names, ftype=u32,
       entry=st.none() | entries(), counted=st.booleans(), old=st.none() | entries(),
       paired=st.booleans(), opened=st.sampled_from([0, events.OPENED_FOR_READ,
                                                     events.OPENED_FOR_WRITE]))
def test_event_round_trip(inode, gen, mask, cookie, name, ftype, entry, counted, old, paired,  # type: ignore[no-untyped-def]
                          opened) -> None:
    ev = events.RemoteEvent(inode, gen, mask, cookie, name, ftype, entry, counted and entry is not None,
                            old, paired, opened)
    frame = events.encode_event(ev)
    r = decode_reply(frame)
    assert r.is_notification and r.error == abi.NotifyCode.NOTIFYFS_EVENT
    assert events.decode_event(r.payload) == ev


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=400))
def test_garbage_raises_protocol_error_only(data: bytes) -> None:
    try:
        events.decode_event(data)
    except ProtocolError:
        pass


def test_truncated_and_stray_bytes() -> None:
    entry = events.make_entry(5, 7, Attr(*range(16)), 1.0, 1.0)
    payload = decode_reply(events.encode_event(events.RemoteEvent(1, 0, 0x100, 0, b"f", 0o100000,
                                                                  entry, True))).payload
    for cut in (1, 10, len(payload) - 1):
        with pytest.raises(ProtocolError):
            events.decode_event(payload[:cut])
    with pytest.raises(ProtocolError):
        events.decode_event(payload + b"x")


def test_fsnotify_request_decodes_as_a_request() -> None:
    req = decode_request(events.fsnotify_request(1 << 63 | 5, 42, 0xFFF, events.FSNOTIFY_SET))
    assert (req.opcode, req.nodeid, req.arg.mask, req.arg.action) == (
        abi.Opcode.NOTIFYFS_FSNOTIFY, 42, 0xFFF, 1)
    assert decode_reply(events.overflow()).error == abi.NotifyCode.NOTIFYFS_OVERFLOW
