"""The injector's decisions that need no mount: which queued events a backlogged injector may drop
(``redundant``), and which marks count for an event (``WatchSet.wants`` / ``followed_by``).

What these decisions do to real watchers is checked end to end by test_load.py (a backlog under
churn) and test_events_live_setup.py (a watch added right after a host change)."""

from __future__ import annotations

import random

import pytest

from notifyfs.agent.injector import redundant
from notifyfs.agent.watchset import WatchSet
from notifyfs.events import RemoteEvent
from notifyfs.linux import inotify as ino

pytestmark = pytest.mark.timeout(60)

D = 7  # a directory's nodeid


def ev(kind: int, name: str, cookie: int = 0, inode: int = D) -> RemoteEvent:
    return RemoteEvent(inode, 1, kind, cookie, name.encode(), 0)


def kept(events: list[RemoteEvent], held: tuple[tuple[int, bytes], ...] = ()) -> list[str]:
    drop = redundant(events, held=held)
    return [f"{ino.mask_names(e.mask & ino.IN_ALL_EVENTS)} {e.name.decode()}"
            for e, d in zip(events, drop, strict=True) if not d]


def test_create_then_delete_of_a_file_goes_away_with_its_touches() -> None:
    events = [ev(ino.IN_CREATE, "a"), ev(ino.IN_OPEN, "a"), ev(ino.IN_MODIFY, "a"),
              ev(ino.IN_CLOSE_WRITE, "a"), ev(ino.IN_DELETE, "a"), ev(ino.IN_CREATE, "b")]
    assert kept(events) == ["CREATE b"]


def test_a_file_that_existed_before_keeps_its_delete() -> None:
    events = [ev(ino.IN_MODIFY, "a"), ev(ino.IN_DELETE, "a"), ev(ino.IN_CREATE, "a"),
              ev(ino.IN_MODIFY, "a")]
    assert kept(events) == ["DELETE a", "CREATE a", "MODIFY a"]


def test_repeated_touches_keep_the_last_of_each_kind() -> None:
    events = [ev(ino.IN_OPEN, "a"), ev(ino.IN_MODIFY, "a"), ev(ino.IN_CLOSE_WRITE, "a"),
              ev(ino.IN_MODIFY, "b"), ev(ino.IN_OPEN, "a"), ev(ino.IN_MODIFY, "a"),
              ev(ino.IN_CLOSE_WRITE, "a")]
    assert kept(events) == ["MODIFY b", "OPEN a", "MODIFY a", "CLOSE_WRITE a"]


def test_moves_are_kept_and_end_what_came_before() -> None:
    events = [ev(ino.IN_CREATE, "a"), ev(ino.IN_MODIFY, "a"), ev(ino.IN_MOVED_FROM, "a", 5),
              ev(ino.IN_MOVED_TO, "b", 5), ev(ino.IN_DELETE, "b")]
    # the CREATE is not undone by a DELETE of the same name: a move lies between
    assert kept(events) == ["CREATE a", "MOVED_FROM a", "MOVED_TO b", "DELETE b"]


def test_a_move_over_a_name_drops_that_names_earlier_touches() -> None:
    events = [ev(ino.IN_MODIFY, "b"), ev(ino.IN_MOVED_FROM, "a", 5), ev(ino.IN_MOVED_TO, "b", 5)]
    assert kept(events) == ["MOVED_FROM a", "MOVED_TO b"]


def test_a_close_of_a_file_held_open_is_never_dropped() -> None:
    events = [ev(ino.IN_CLOSE_WRITE, "a"), ev(ino.IN_MODIFY, "a"), ev(ino.IN_CLOSE_WRITE, "a"),
              ev(ino.IN_DELETE, "a")]
    # each close ends an OPEN the injector made: only the MODIFY before the DELETE goes
    assert kept(events, held=((D, b"a"),)) == ["CLOSE_WRITE a", "CLOSE_WRITE a", "DELETE a"]


def test_directories_keep_their_create_and_delete() -> None:
    events = [ev(ino.IN_CREATE | ino.IN_ISDIR, "d"), ev(ino.IN_DELETE | ino.IN_ISDIR, "d")]
    assert kept(events) == ["CREATE d", "DELETE d"]


def test_the_final_listing_is_what_the_full_sequence_gives() -> None:
    """A watcher that keeps a directory listing from the events ends with the same listing
    whether it gets every event or only those ``redundant`` keeps (random churn on few names,
    as a host that changes files faster than the injector can inject)."""
    rnd = random.Random(1)
    for _round in range(200):
        listing: set[str] = {"a", "b"}
        start = set(listing)
        events: list[RemoteEvent] = []
        cookie = 0
        for _ in range(rnd.randint(1, 60)):
            name = rnd.choice("abcd")
            if name in listing:
                op = rnd.choice(["touch", "touch", "delete", "move"])
                if op == "touch":
                    events.append(ev(rnd.choice([ino.IN_MODIFY, ino.IN_ATTRIB, ino.IN_OPEN,
                                                 ino.IN_CLOSE_WRITE]), name))
                elif op == "delete":
                    listing.discard(name)
                    events.append(ev(ino.IN_DELETE, name))
                else:
                    to = rnd.choice("abcd")
                    if to == name:
                        continue
                    cookie += 1
                    listing.discard(name)
                    listing.add(to)
                    events += [ev(ino.IN_MOVED_FROM, name, cookie), ev(ino.IN_MOVED_TO, to, cookie)]
            else:
                listing.add(name)
                events.append(ev(ino.IN_CREATE, name))
        replay = set(start)
        for e, d in zip(events, redundant(events), strict=True):
            if d:
                continue
            kind, name = e.mask & ino.IN_ALL_EVENTS, e.name.decode()
            if kind in (ino.IN_CREATE, ino.IN_MOVED_TO):
                replay.add(name)
            elif kind in (ino.IN_DELETE, ino.IN_MOVED_FROM):
                replay.discard(name)
        assert replay == listing, events


def test_a_mark_counts_only_for_the_kinds_it_asks_for() -> None:
    ws = WatchSet(masks={D: ino.IN_CREATE | ino.IN_DELETE}, started=10.0)
    assert ws.wants(11.0, (D, ino.IN_CREATE))
    assert not ws.wants(11.0, (D, ino.IN_OPEN), (0, ino.IN_OPEN))
    assert ws.wants(11.0, (3, ino.IN_ATTRIB), (D, ino.IN_DELETE))
    everything = WatchSet(everything=ino.IN_MODIFY, started=10.0)
    assert everything.wants(11.0, (99, ino.IN_MODIFY))
    assert not everything.wants(11.0, (99, ino.IN_ATTRIB))


def test_a_mark_newer_than_an_event_does_not_count_for_it() -> None:
    first = WatchSet(masks={}, started=1.0).followed_by(WatchSet(masks={}, started=1.0))
    second = first.followed_by(WatchSet(masks={D: ino.IN_ALL_EVENTS}, started=5.0))
    # the scan at 1.0 did not see the mark: an event that reached the agent before then
    # happened before the watch; one after may have happened after it
    assert not second.wants(0.5, (D, ino.IN_MODIFY))
    assert second.wants(1.5, (D, ino.IN_MODIFY))
    third = second.followed_by(WatchSet(masks={D: ino.IN_ALL_EVENTS}, started=9.0))
    assert third.added_after[D] == 1.0  # carried over while the mark stays
    # marks that existed at the first scan count for everything after it
    boot = WatchSet().followed_by(WatchSet(masks={D: ino.IN_MODIFY}, started=2.0))
    assert boot.wants(0.0, (D, ino.IN_MODIFY))
