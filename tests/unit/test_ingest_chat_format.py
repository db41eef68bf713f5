"""Ingest speaks today's chat format: content parts, tool calls and tool turns, `developer`,
`name`, a size cap per session; what it leaves out is counted, never a whole-session
refusal for a session's shape. The endpoint reads requests with the same code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fleetmind.client.scrub import scrub_session
from fleetmind.client.serve.protocol import ApiError, ChatRequest
from fleetmind.client.store import (
    ChatFormat,
    Dropped,
    Message,
    Session,
    SessionStore,
    ToolCall,
    content_hash,
)

WEATHER_CALL = {"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Lyon"}'}}


def todays_session(**extra) -> dict:
    return {"id": "s1", "user": "u1", "messages": [
        {"role": "developer", "content": "answer briefly"},
        {"role": "user", "name": "ana", "content": [
            {"type": "text", "text": "what is in this picture"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            {"type": "text", "text": "and the weather in Lyon?"}]},
        {"role": "assistant", "content": None, "tool_calls": [WEATHER_CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
        {"role": "assistant", "content": [{"type": "text", "text": "a cat; 21 degrees."}]},
    ], **extra}


def test_todays_format_is_read_whole() -> None:
    session, dropped = Session.read(todays_session())
    assert [m.role for m in session.messages] == ["system", "user", "assistant", "tool",
                                                   "assistant"]
    assert session.messages[0] == Message("system", "answer briefly")
    assert session.messages[1] == Message(
        "user", "what is in this picture\nand the weather in Lyon?", name="ana")
    assert session.messages[2].content == ""
    assert session.messages[2].tool_calls == (
        ToolCall("call_1", "get_weather", '{"city": "Lyon"}'),)
    assert session.messages[3].tool_call_id == "call_1"
    assert dropped == Dropped(parts=1)


def test_tool_turns_can_be_dropped_by_setting_and_are_counted() -> None:
    session, dropped = Session.read(todays_session(), ChatFormat(tools="drop"))
    assert [m.role for m in session.messages] == ["system", "user", "assistant"]
    assert session.messages[-1].content == "a cat; 21 degrees."
    assert dropped == Dropped(parts=1, tool_turns=2)


def test_a_call_with_text_keeps_the_text_when_tools_are_dropped() -> None:
    raw = {"messages": [{"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "let me look", "tool_calls": [
                            WEATHER_CALL]}]}
    session, dropped = Session.read(raw, ChatFormat(tools="drop"))
    assert session.messages[1] == Message("assistant", "let me look")
    assert dropped == Dropped(tool_turns=1)


def test_legacy_function_calls_and_object_arguments_are_read() -> None:
    raw = {"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None,
         "function_call": {"name": "lookup", "arguments": {"q": "x"}}},
        {"role": "function", "name": "lookup", "content": "found"}]}
    session = Session.from_dict(raw)
    assert session.messages[1].tool_calls == (ToolCall("", "lookup", '{"q": "x"}'),)
    assert session.messages[2] == Message("tool", "found", name="lookup")


def test_turns_left_empty_are_dropped_and_counted() -> None:
    raw = {"messages": [
        {"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]},
        {"role": "user", "content": "  "},
        {"role": "user", "content": "the real question"}]}
    session, dropped = Session.read(raw)
    assert session.messages == (Message("user", "the real question"),)
    assert dropped == Dropped(parts=1, empty_turns=2)


@pytest.mark.parametrize("turn, says", [
    ({"role": "robot", "content": "x"}, "messages[1].role='robot'"),
    ({"role": "user", "content": 7}, "messages[1].content is a int"),
    ({"role": "user", "content": [{"text": "no type"}]}, "messages[1].content[0] must be"),
    ({"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]},
     "messages[1].tool_calls[0] must be an object with a 'function'"),
    ({"role": "assistant", "content": None, "tool_calls": [{"function": {"name": ""}}]},
     "messages[1].tool_calls[0]: tool call has no function name"),
    ({"role": "user"}, "messages[1] must be an object with 'role' and 'content'"),
])
def test_what_cannot_be_read_says_which_turn_and_field(turn: dict, says: str) -> None:
    with pytest.raises(ValueError, match=None) as error:
        Session.from_dict({"messages": [{"role": "user", "content": "q"}, turn]})
    assert says in str(error.value)


def test_a_plain_sessions_hash_is_unchanged_by_the_new_fields() -> None:
    """Stores written before today's format keep deduplicating against new input."""
    messages = (Message("user", "q"), Message("assistant", "a"))
    canonical = json.dumps([{"content": "q", "role": "user"},
                            {"content": "a", "role": "assistant"}],
                           sort_keys=True, separators=(",", ":"))
    import hashlib
    assert content_hash(messages) == hashlib.sha256(canonical.encode()).hexdigest()


def test_tool_turns_round_trip_through_the_store(tmp_path: Path) -> None:
    session = Session.from_dict(todays_session())
    with SessionStore(tmp_path / "s.db") as store:
        assert store.add(session)
        assert store.get("s1") == session
        assert Session.from_dict(session.to_dict()) == session


def test_a_session_over_the_cap_is_refused_with_its_size(tmp_path: Path) -> None:
    huge = {"id": "big", "messages": [{"role": "user", "content": "x" * 5000}]}
    with pytest.raises(ValueError, match=r"session is \d+ bytes of messages, over the cap of "
                                         r"4096 per session \(max_session_bytes\)"):
        Session.from_dict(huge, ChatFormat(max_session_bytes=4096))
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps(huge) + "\n" + json.dumps(todays_session()) + "\n")
    with SessionStore(tmp_path / "s.db") as store:
        report = store.ingest_file(path, fmt=ChatFormat(max_session_bytes=4096))
    assert (report.stored, report.rejected) == (1, 1)
    assert "over the cap" in report.problems[0].message
    assert report.dropped == Dropped(parts=1)


def test_a_line_far_over_the_cap_is_refused_before_parsing(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "y" * 50_000}]})
                    + "\n")
    with SessionStore(tmp_path / "s.db") as store:
        report = store.ingest_file(path, fmt=ChatFormat(max_session_bytes=1000))
    assert report.rejected == 1 and "far over the cap" in report.problems[0].message


def test_ingest_counts_what_it_dropped_across_a_file(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    second = todays_session(id="s2")
    second["messages"][1]["content"].append({"type": "file", "file": {}})
    path.write_text(json.dumps(todays_session()) + "\n" + json.dumps(second) + "\n")
    with SessionStore(tmp_path / "s.db") as store:
        report = store.ingest_file(path, fmt=ChatFormat(tools="drop"))
    # Without its file part the second is the first conversation again: one session.
    assert (report.stored, report.duplicates) == (1, 1)
    assert report.dropped == Dropped(parts=3, tool_turns=4)


def test_chat_format_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="tools='sometimes'"):
        ChatFormat(tools="sometimes")
    with pytest.raises(ValueError, match="max_session_bytes=0"):
        ChatFormat(max_session_bytes=0)


def test_the_scrubber_cleans_tool_arguments_too() -> None:
    raw = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "mail ana@example.com"}]},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "c", "type": "function",
            "function": {"name": "send", "arguments": '{"to": "ana@example.com"}'}}]}]}
    clean_dict, report = scrub_session(raw)
    assert clean_dict["messages"][0]["content"][0]["text"] == "mail [EMAIL]"
    assert clean_dict["messages"][1]["tool_calls"][0]["function"]["arguments"] == \
        '{"to": "[EMAIL]"}'
    assert report.email == 2
    clean, report = scrub_session(Session.from_dict(raw))
    assert clean.messages[0].content == "mail [EMAIL]"
    assert clean.messages[1].tool_calls[0].arguments == '{"to": "[EMAIL]"}'
    assert report.email == 2


def test_the_endpoint_reads_requests_with_the_same_rules() -> None:
    body = {"model": "fleetmind", **todays_session(), "store": False, "user": "u9",
            "metadata": {"conversation_id": "c7"}}
    request = ChatRequest.parse(json.dumps(body).encode())
    assert request.messages == Session.from_dict(todays_session()).messages
    assert (request.store, request.user, request.conversation_id) == (False, "u9", "c7")
    with pytest.raises(ApiError) as refused:
        ChatRequest.parse(json.dumps({"model": "m", "messages": [
            {"role": "robot", "content": "x"}]}).encode())
    assert refused.value.status == 400 and refused.value.param == "messages"
