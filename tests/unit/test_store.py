"""The session store: validation, ingest with line-numbered problems, deduplication,
consolidation records, and crash safety (the SIGKILL case is in
integration/test_killed_writers.py)."""

import json
import sqlite3
from pathlib import Path

import pytest
from support.sessions import chat, write_jsonl

from fleetmind.client.store import (
    MAX_PROBLEMS_KEPT,
    Message,
    Session,
    SessionStore,
    content_hash,
    parse_line,
)


@pytest.fixture
def store(tmp_path: Path):
    with SessionStore(tmp_path / "site" / "sessions.db") as opened:
        yield opened


# -- the session record ------------------------------------------------------------------

def test_a_session_round_trips_through_its_dict() -> None:
    session = Session.from_dict(chat(1, user="u1"))
    assert session.messages[0] == Message("user", "the color of moukrain1 is gleeplix .")
    assert Session.from_dict(session.to_dict()) == session
    assert session.to_dict() == chat(1, user="u1")


@pytest.mark.parametrize("raw, names", [
    ([1, 2], "JSON object"),
    ({"id": "a"}, "'messages' must be a non-empty list"),
    ({"id": "a", "messages": []}, "'messages' must be a non-empty list"),
    ({"id": "a", "messages": "hi"}, "'messages' must be a non-empty list"),
    ({"id": "a", "messages": [{"role": "user"}]}, "messages[0] must be an object"),
    ({"id": "a", "messages": [{"role": "user", "content": "q"},
                              {"role": "robot", "content": "x"}]}, "messages[1].role='robot'"),
    ({"id": "a", "messages": [{"role": "user", "content": "  "}]}, "no user turn"),
    ({"id": "a", "messages": [{"role": "user", "content": [{"type": "text"}]}]},
     "messages[0].content[0] is a text part without a 'text'"),
    ({"id": "a", "messages": [{"role": "assistant", "content": "hi"}]}, "no user turn"),
    ({"id": "", "messages": [{"role": "user", "content": "q"}]}, "id=''"),
    ({"id": 7, "messages": [{"role": "user", "content": "q"}]}, "id=7"),
    ({"id": "a", "user": 5, "messages": [{"role": "user", "content": "q"}]}, "user=5"),
    ({"id": "a\nb", "messages": [{"role": "user", "content": "q"}]}, "printable"),
])
def test_invalid_sessions_say_what_is_wrong(raw: object, names: str) -> None:
    with pytest.raises(ValueError) as error:
        Session.from_dict(raw)
    assert names in str(error.value)


def test_a_session_is_validated_at_construction_too() -> None:
    with pytest.raises(ValueError, match="role"):
        Message("robot", "hi")
    with pytest.raises(ValueError, match="tuple of Message"):
        Session(id="a", messages=[Message("user", "hi")])  # type: ignore[arg-type]


def test_a_line_without_an_id_is_named_by_its_content() -> None:
    raw = {"messages": chat(1)["messages"]}
    session = Session.from_dict(raw)
    assert session.id == "sha256:" + session.content_hash[:16]
    assert session.content_hash == content_hash(session.messages)


def test_the_content_hash_depends_on_user_and_messages_not_the_id() -> None:
    a, b = Session.from_dict(chat(1, user="u1")), Session.from_dict({**chat(1, user="u1"),
                                                                     "id": "x"})
    assert a.content_hash == b.content_hash
    assert a.content_hash != Session.from_dict(chat(2, user="u1")).content_hash
    # two users saying the same thing are two sessions: the fleet learns what several say
    assert a.content_hash != Session.from_dict(chat(1, user="u2")).content_hash
    assert a.content_hash != Session.from_dict(chat(1)).content_hash


def test_parse_line_handles_blank_bom_and_crlf() -> None:
    assert parse_line(b"   \n") is None
    line = ("\ufeff" + json.dumps(chat(1)) + "\r\n").encode()
    assert parse_line(line) == Session.from_dict(chat(1))
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_line(b"{oops\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        parse_line(b'{"id": "\xff"}\n')


# -- adding and reading ------------------------------------------------------------------

def test_add_get_iterate_count(store: SessionStore) -> None:
    assert store.add(chat(1, user="u1")) is True
    assert store.add(Session.from_dict(chat(2))) is True
    assert len(store) == 2 and "s00001" in store and "nope" not in store
    assert store.get("s00001") == Session.from_dict(chat(1, user="u1"))
    assert [s.id for s in store] == ["s00001", "s00002"]
    with pytest.raises(KeyError, match="nope"):
        store.get("nope")


def test_same_messages_are_a_duplicate_whatever_the_id(store: SessionStore) -> None:
    assert store.add(chat(1)) is True
    assert store.add(chat(1)) is False
    assert store.add({**chat(1), "id": "another"}) is False
    assert len(store) == 1
    assert store.add({**chat(1), "id": "another", "user": "u9"}) is True


def test_a_taken_id_with_other_messages_is_refused(store: SessionStore) -> None:
    store.add(chat(1))
    with pytest.raises(ValueError, match="unique id"):
        store.add({**chat(2), "id": "s00001"})
    assert store.get("s00001") == Session.from_dict(chat(1))


def test_a_folder_gets_a_store_inside_and_reopening_keeps_everything(tmp_path: Path) -> None:
    with SessionStore(tmp_path) as first:
        first.add(chat(1))
        first.record_consolidation("c1", ["s00001"])
    assert (tmp_path / "sessions.db").is_file()
    with SessionStore(tmp_path / "sessions.db") as again:
        assert [s.id for s in again] == ["s00001"]
        assert again.sessions_used_by("c1") == ["s00001"]
        assert again._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert again._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_a_file_that_is_not_a_store_is_refused(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello, this is not a database at all" * 50)
    with pytest.raises(ValueError, match="not a session store"):
        SessionStore(text)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE t (x)")
    with pytest.raises(ValueError, match="not a fleetmind session store"):
        SessionStore(other)


# -- ingest ------------------------------------------------------------------------------

def test_ingest_stores_the_good_lines_and_reports_the_bad_by_line(store: SessionStore,
                                                                  tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [
        chat(1),                                            # 1 stored
        "{not json",                                        # 2 bad JSON
        chat(2, user="u2"),                                 # 3 stored
        "",                                                 # 4 blank: ignored
        {"id": "x", "messages": [{"role": "robot", "content": "t"}]},      # 5 wrong role
        {"id": "y", "messages": [{"role": "user", "content": ""}]},        # 6 nothing said
        {"id": "z"},                                        # 7 missing messages
        chat(1),                                            # 8 duplicate of line 1
        {**chat(3), "id": "s00001"},                        # 9 id taken, other messages
        ["a", "list"],                                      # 10 not an object
    ])
    report = store.ingest_file(path)
    assert (report.stored, report.duplicates, report.rejected) == (2, 1, 6)
    assert [p.line for p in report.problems] == [2, 5, 6, 7, 9, 10]
    assert str(report.problems[0]).startswith(f"{path}:2: not valid JSON")
    assert "role='robot'" in report.problems[1].message
    assert "no user turn" in report.problems[2].message  # its empty turn was dropped first
    assert "unique id" in report.problems[4].message
    assert [s.id for s in store] == ["s00001", "s00002"]
    assert store.get("s00002").user == "u2"


def test_ingesting_the_same_file_twice_stores_nothing_new(store: SessionStore,
                                                          tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [chat(n) for n in range(5)])
    assert store.ingest_file(path, batch=2).stored == 5
    again = store.ingest_file(path)
    assert (again.stored, again.duplicates, again.rejected) == (0, 5, 0)
    assert len(store) == 5


def test_ingest_acknowledges_only_what_it_stored(store: SessionStore, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [chat(1), chat(1), "bad", chat(2)])
    acknowledged: list[str] = []
    store.ingest_file(path, on_stored=acknowledged.append, batch=1)
    assert acknowledged == ["s00001", "s00002"]


def test_problems_kept_are_capped_but_all_counted(store: SessionStore, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", ["nope"] * (MAX_PROBLEMS_KEPT + 5))
    report = store.ingest_file(path)
    assert report.rejected == MAX_PROBLEMS_KEPT + 5
    assert len(report.problems) == MAX_PROBLEMS_KEPT


def test_ingest_a_missing_file_or_bad_batch_says_so(store: SessionStore, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        store.ingest_file(tmp_path / "absent.jsonl")
    path = write_jsonl(tmp_path / "in.jsonl", [chat(1)])
    with pytest.raises(ValueError, match="batch=0"):
        store.ingest_file(path, batch=0)


# -- consolidations ----------------------------------------------------------------------

def test_consolidations_record_their_sessions_both_ways(store: SessionStore) -> None:
    for n in range(4):
        store.add(chat(n))
    assert [s.id for s in store.unconsumed()] == ["s00000", "s00001", "s00002", "s00003"]
    store.record_consolidation("c1", ["s00001", "s00000", "s00001"])
    store.record_consolidation("c2", ["s00001", "s00002"])
    assert store.sessions_used_by("c1") == ["s00000", "s00001"]
    assert store.consolidations_using("s00001") == ["c1", "c2"]
    assert store.consolidations_using("s00003") == []
    assert [s.id for s in store.unconsumed()] == ["s00003"]
    assert store.sessions_used_by("never") == []


def test_recording_a_consolidation_again_is_idempotent_or_refused(store: SessionStore) -> None:
    store.add(chat(1))
    store.add(chat(2))
    store.record_consolidation("c1", ["s00001"])
    store.record_consolidation("c1", ["s00001"])  # a retry
    with pytest.raises(ValueError, match="already recorded"):
        store.record_consolidation("c1", ["s00001", "s00002"])
    with pytest.raises(ValueError, match="unknown session ids \\['ghost'\\]"):
        store.record_consolidation("c2", ["s00002", "ghost"])
    with pytest.raises(ValueError, match="at least one"):
        store.record_consolidation("c3", [])
    assert store.consolidations_using("s00002") == []  # nothing half-written


# -- stitching, forgetting, retention ---------------------------------------------------------

def test_replace_continues_an_unconsumed_session_in_place(store: SessionStore) -> None:
    first = Session.from_dict(chat(1, user="u1"))
    store.add(first)
    store.add(chat(2))
    longer = Session(id=first.id, user="u1", messages=(
        *first.messages, Message("user", "and moukrain2 ?"), Message("assistant", "noted .")))
    assert store.find(first.content_hash) == first.id
    assert store.replace(longer) is True
    assert store.get(first.id) == longer
    assert [s.id for s in store] == [first.id, "s00002"]  # its place in arrival order
    assert store.find(first.content_hash) is None
    assert store.replace(longer) is False  # the same messages again: nothing to do
    with pytest.raises(ValueError, match="no session 'nope' to replace"):
        store.replace(Session(id="nope", messages=longer.messages))
    store.record_consolidation("c1", [first.id])
    with pytest.raises(ValueError, match="never rewritten"):
        store.replace(Session(id=first.id, user="u1", messages=first.messages))


def test_delete_user_removes_their_sessions_and_usage_records(store: SessionStore) -> None:
    for number, user in enumerate(["a", "a", "b", None], start=1):
        store.add(chat(number, user=user))
    store.record_consolidation("c1", ["s00001", "s00003"])
    assert store.user_sessions("a") == ["s00001", "s00002"]
    assert store.delete_user("a") == ["s00001", "s00002"]
    assert [s.id for s in store] == ["s00003", "s00004"]
    assert store.sessions_used_by("c1") == ["s00003"]
    assert store.delete_user("a") == []
    with pytest.raises(ValueError, match="user=''"):
        store.delete_user("")


def test_expire_deletes_sessions_older_than_the_ttl(store: SessionStore) -> None:
    store.add(chat(1))
    store.add(chat(2))
    store._db.execute("UPDATE sessions SET added_at = added_at - 7200 WHERE id = 's00001'")
    assert store.expire(3600) == ["s00001"]
    assert [s.id for s in store] == ["s00002"]
    assert store.expire(3600, now=10**12) == ["s00002"]
    with pytest.raises(ValueError, match="TTL"):
        store.expire(0)


def test_stats_count_sessions_users_and_the_unattributed(store: SessionStore) -> None:
    for number, user in enumerate(["a", "a", "b", None, None], start=1):
        store.add(chat(number, user=user))
    store.record_consolidation("c1", ["s00001"])
    stats = store.stats()
    assert (stats.sessions, stats.users, stats.unconsumed, stats.without_user,
            stats.consolidations) == (5, 2, 4, 2, 1)
    assert stats.oldest_added_at <= stats.newest_added_at
    assert set(stats.as_dict()) >= {"sessions", "users", "unconsumed", "without_user"}
