"""`fleetmind client serve`, driven over real HTTP with the official `openai` client: the
embedded endpoint (non-streaming and streaming), what it captures, hot-swap under
concurrent requests, proxy mode against a second fleetmind endpoint as the upstream, and
every refusal with its status.

Versions are PEFT adapters with random B under a site folder; the tests flip the site's
`current` link the way activation does (rename(2) of a new symlink) without signing
anything: the link is all the endpoint reads.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from support.net import eventually

from fleetmind.client.serve.cli import main as cli_main
from fleetmind.client.serve.engine import EmbeddedEngine
from fleetmind.client.serve.metrics import ServeMetrics
from fleetmind.client.serve.runner import BackgroundServer
from fleetmind.client.serve.settings import ServeConfig
from fleetmind.client.store import SessionStore
from fleetmind.sim import world as W

# Names the toy model knows as words (an unknown word reads as <unk>, and it stops there).
PROMPTS = [f"what is the color of {name} ?" for name in W.lexicon().names[:6]]


def point_current(site: Path, version: int) -> None:
    """`current -> versions/<8 digits>`, flipped atomically as client/versions.py does."""
    temporary = site / f".current-{version}"
    os.symlink(Path("versions") / f"{version:08d}", temporary)
    os.replace(temporary, site / "current")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, toy_model_dir: Path) -> Path:
    """A folder holding versions/00000001 and versions/00000002: PEFT adapters whose random
    B make the two versions answer differently (at std 0.3 both still answer in full)."""
    from fleetmind.client import lora
    from fleetmind.client.model import load_model

    root = tmp_path_factory.mktemp("adapters")
    for version in (1, 2):
        model, _ = load_model(toy_model_dir)
        peft_model = lora.attach_lora(model, seed=version)
        rng = np.random.default_rng(version)
        lora.set_b(peft_model, {name: rng.normal(0, 0.3, b.shape).astype(np.float32)
                                for name, b in lora.get_b(peft_model).items()})
        lora.save_adapter(peft_model, root / "versions" / f"{version:08d}")
    return root


def make_site(tmp_path: Path, adapters: Path, version: int | None = 1) -> Path:
    site = tmp_path / "site"
    (site / "versions").mkdir(parents=True)
    for folder in (adapters / "versions").iterdir():
        (site / "versions" / folder.name).symlink_to(folder, target_is_directory=True)
    if version is not None:
        point_current(site, version)
    return site


def config(model_dir: Path, **settings) -> ServeConfig:
    return ServeConfig(model_dir=model_dir, listen="127.0.0.1:0", device="cpu", **settings)


def client(server: BackgroundServer, **options) -> openai.OpenAI:
    # No retries: a 429 or 5xx must reach the test as it was sent.
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         **options)


def ask(api: openai.OpenAI, prompt: str, **options):
    return api.chat.completions.create(model="fleetmind", temperature=0, max_tokens=24,
                                       messages=[{"role": "user", "content": prompt}],
                                       **options)


def ask_streaming(api: openai.OpenAI, prompt: str, **options) -> tuple[str, set[str], object]:
    """(text, the fingerprints of every chunk, usage) of a streamed answer."""
    stream = api.chat.completions.create(
        model="fleetmind", temperature=0, max_tokens=24, stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": prompt}], **options)
    text, marks, usage = [], set(), None
    for chunk in stream:
        marks.add(chunk.system_fingerprint)
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
    return "".join(text), marks, usage


def stored(server: BackgroundServer, site: Path) -> list[dict]:
    server.app.state.capture.join()
    with SessionStore(site) as store:
        return [session.to_dict() for session in store]


@pytest.fixture(scope="module")
def expected(tmp_path_factory: pytest.TempPathFactory, adapters: Path,
             toy_model_dir: Path) -> dict[str, dict[str, str]]:
    """Each prompt's greedy answer by fingerprint (fm-base, fm-v00000001, fm-v00000002),
    one version at a time."""
    site = make_site(tmp_path_factory.mktemp("expected"), adapters, version=None)
    answers: dict[str, dict[str, str]] = {}
    with BackgroundServer(config(toy_model_dir, data_dir=site, capture=False)) as server:
        api = client(server)
        for version in (None, 1, 2):
            if version is not None:
                point_current(site, version)
            for prompt in PROMPTS:
                reply = ask(api, prompt)
                answers.setdefault(reply.system_fingerprint, {})[prompt] = \
                    reply.choices[0].message.content
    assert set(answers) == {"fm-base", "fm-v00000001", "fm-v00000002"}
    assert answers["fm-v00000001"] != answers["fm-v00000002"], "versions must differ"
    return answers


# -- the embedded endpoint ---------------------------------------------------------------------

def test_the_official_client_gets_answers_plain_and_streamed(tmp_path: Path, adapters: Path,
                                                             toy_model_dir: Path,
                                                             expected: dict) -> None:
    site = make_site(tmp_path, adapters)
    with BackgroundServer(config(toy_model_dir, data_dir=site)) as server:
        api = client(server)
        reply = ask(api, PROMPTS[0], user="alice")
        assert reply.model == "fleetmind" and reply.object == "chat.completion"
        assert reply.system_fingerprint == "fm-v00000001"
        assert reply.choices[0].message.content == expected["fm-v00000001"][PROMPTS[0]]
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0
        assert reply.usage.total_tokens == (reply.usage.prompt_tokens
                                            + reply.usage.completion_tokens)

        text, marks, usage = ask_streaming(api, PROMPTS[0], user="alice")
        assert text == expected["fm-v00000001"][PROMPTS[0]]
        assert marks == {"fm-v00000001"}
        assert usage.completion_tokens == reply.usage.completion_tokens

        assert [m.id for m in api.models.list()] == ["fleetmind"]
        assert httpx.get(server.url + "/health").json() == {"status": "ok"}
        ready = httpx.get(server.url + "/ready").json()
        assert ready["status"] == "ready" and ready["version"] == 1
        metrics = httpx.get(server.url + "/metrics").text
        assert 'fleetmind_serve_requests_total{status="200"} 2.0' in metrics
        assert "fleetmind_serve_active_version 1.0" in metrics


# -- capture -----------------------------------------------------------------------------------

def test_completed_conversations_are_stored_by_user_and_opt_outs_are_not(
        tmp_path: Path, adapters: Path, toy_model_dir: Path, expected: dict) -> None:
    site = make_site(tmp_path, adapters)
    with BackgroundServer(config(toy_model_dir, data_dir=site)) as server:
        api = client(server)
        ask(api, PROMPTS[0], user="alice")
        ask_streaming(api, PROMPTS[1], extra_headers={"x-fleetmind-user": "bob"})
        ask(api, PROMPTS[2])                                      # no user: counted
        ask(api, PROMPTS[3], user="carol", store=False)            # opted out
        ask_streaming(api, PROMPTS[4], user="carol", extra_body={"store": False})
        sessions = stored(server, site)
        metrics = httpx.get(server.url + "/metrics").text
    by_prompt = {s["messages"][0]["content"]: s for s in sessions}
    assert set(by_prompt) == set(PROMPTS[:3])
    assert by_prompt[PROMPTS[0]]["user"] == "alice"
    assert by_prompt[PROMPTS[1]]["user"] == "bob"
    assert "user" not in by_prompt[PROMPTS[2]]
    for prompt in PROMPTS[:3]:  # what the model actually said
        assert by_prompt[prompt]["messages"][1] == {
            "role": "assistant", "content": expected["fm-v00000001"][prompt]}
    assert 'fleetmind_serve_sessions_captured_total{outcome="opted_out"} 2.0' in metrics
    assert "fleetmind_serve_sessions_without_user_total 1.0" in metrics

    assert cli_main(["sessions", "--store", str(site), "--json"]) == 0


def test_the_site_wide_switch_stores_nothing(tmp_path: Path, adapters: Path,
                                             toy_model_dir: Path) -> None:
    site = make_site(tmp_path, adapters)
    with BackgroundServer(config(toy_model_dir, data_dir=site, capture=False)) as server:
        ask(client(server), PROMPTS[0], user="alice")
        assert stored(server, site) == []


def test_a_conversation_across_requests_is_one_session(tmp_path: Path, adapters: Path,
                                                       toy_model_dir: Path) -> None:
    site = make_site(tmp_path, adapters)
    with BackgroundServer(config(toy_model_dir, data_dir=site)) as server:
        api = client(server)

        def turn(history: list[dict], prompt: str, **options) -> list[dict]:
            history = [*history, {"role": "user", "content": prompt}]
            reply = api.chat.completions.create(model="fleetmind", temperature=0,
                                                max_tokens=16, messages=history, **options)
            return [*history, {"role": "assistant",
                               "content": reply.choices[0].message.content}]

        # By conversation id (a header, or metadata.conversation_id).
        tagged = {"extra_headers": {"x-fleetmind-conversation": "c-1"}, "user": "alice"}
        history = turn([], PROMPTS[0], **tagged)
        history = turn(history, PROMPTS[1], **tagged)
        meta = {"metadata": {"conversation_id": "c-1"}, "user": "alice"}
        history = turn(history, PROMPTS[2], **meta)
        # Without an id: the second request's messages begin with the stored first exchange.
        plain = turn([], PROMPTS[3], user="bob")
        plain = turn(plain, PROMPTS[4], user="bob")
        sessions = stored(server, site)

        assert len(sessions) == 2
        by_user = {s["user"]: s for s in sessions}
        assert by_user["alice"]["messages"] == history and len(history) == 6
        assert by_user["bob"]["messages"] == plain and len(plain) == 4

        # Once a consolidation used it, a session is never rewritten: a new segment starts.
        with SessionStore(site) as store:
            store.record_consolidation("c1", [by_user["alice"]["id"]])
        turn(history, PROMPTS[5], **tagged)
        sessions = stored(server, site)
        alice = sorted((s for s in sessions if s["user"] == "alice"), key=lambda s: s["id"])
        assert [len(s["messages"]) for s in alice] == [6, 8]
        assert alice[1]["id"] == alice[0]["id"] + "-2"


def test_forget_deletes_a_users_sessions(tmp_path: Path, adapters: Path, toy_model_dir: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    site = make_site(tmp_path, adapters)
    with BackgroundServer(config(toy_model_dir, data_dir=site)) as server:
        api = client(server)
        for prompt in PROMPTS[:3]:
            ask(api, prompt, user="alice")
        ask(api, PROMPTS[3], user="bob")
        stored(server, site)
    capsys.readouterr()
    assert cli_main(["sessions", "--store", str(site), "--json"]) == 0
    before = json.loads(capsys.readouterr().out)
    assert (before["sessions"], before["users"], before["unconsumed"]) == (4, 2, 4)
    assert cli_main(["forget", "--user", "alice", "--store", str(site), "--json"]) == 0
    forgot = json.loads(capsys.readouterr().out)
    assert forgot["deleted"] == 3 and forgot["already_consolidated"] == 0
    assert cli_main(["sessions", "--store", str(site), "--json"]) == 0
    after = json.loads(capsys.readouterr().out)
    assert (after["sessions"], after["users"]) == (1, 1)


# -- hot-swap ----------------------------------------------------------------------------------

def test_hot_swap_under_concurrent_requests(tmp_path: Path, adapters: Path,
                                            toy_model_dir: Path, expected: dict) -> None:
    site = make_site(tmp_path, adapters)
    settings = config(toy_model_dir, data_dir=site, keep_adapters=1, max_concurrency=64,
                      capture=False)
    with BackgroundServer(settings) as server:
        api = client(server)
        # A stream that started on version 1 finishes on it, though 2 is activated midway
        # and keep_adapters=1 would unload 1 as soon as nothing uses it.
        pinned = api.chat.completions.create(
            model="fleetmind", temperature=0, max_tokens=24, stream=True,
            messages=[{"role": "user", "content": PROMPTS[0]}])
        chunks = iter(pinned)
        first = next(chunks)
        assert first.system_fingerprint == "fm-v00000001"

        results: list[tuple[str, str, str]] = []  # (prompt, fingerprint, text)
        failures: list[BaseException] = []
        swapped = threading.Event()

        def user(number: int) -> None:
            try:
                for round_ in range(6):
                    prompt = PROMPTS[(number + round_) % len(PROMPTS)]
                    if (number + round_) % 2:
                        text, marks, _ = ask_streaming(api, prompt)
                        assert len(marks) == 1, f"one stream, several versions: {marks}"
                        results.append((prompt, marks.pop(), text))
                    else:
                        reply = ask(api, prompt)
                        results.append((prompt, reply.system_fingerprint,
                                        reply.choices[0].message.content))
                    if number == 0 and round_ == 2:
                        point_current(site, 2)
                        swapped.set()
            except BaseException as error:  # reported below
                failures.append(error)

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(user, range(8)))
        rest = [first, *chunks]
        assert not failures, failures
        assert swapped.is_set()
        assert {c.system_fingerprint for c in rest} == {"fm-v00000001"}
        text = "".join(choice.delta.content or "" for c in rest for choice in c.choices)
        assert text == expected["fm-v00000001"][PROMPTS[0]]

        assert {mark for _, mark, _ in results} == {"fm-v00000001", "fm-v00000002"}
        for prompt, mark, text in results:  # each answer is wholly one version's
            assert text == expected[mark][prompt], (prompt, mark)
        after = ask(api, PROMPTS[1])
        assert after.system_fingerprint == "fm-v00000002"
        eventually(lambda: httpx.get(server.url + "/ready").json()["adapters"] == [
            "v00000002"])
        assert "fleetmind_serve_adapter_unloads_total 1.0" in \
            httpx.get(server.url + "/metrics").text


# -- proxy mode --------------------------------------------------------------------------------

def test_proxy_mode_serves_the_active_adapter_upstream(tmp_path: Path, adapters: Path,
                                                       toy_model_dir: Path,
                                                       expected: dict) -> None:
    site = make_site(tmp_path, adapters)
    upstream_settings = config(toy_model_dir, runtime_lora=True, capture=False)
    with BackgroundServer(upstream_settings) as upstream:
        proxy_settings = ServeConfig(upstream=upstream.url, data_dir=site, listen="127.0.0.1:0",
                                     keep_adapters=1)
        with BackgroundServer(proxy_settings) as proxy:
            api = client(proxy)
            reply = ask(api, PROMPTS[0], user="alice")
            assert reply.model == "fleetmind"
            assert reply.system_fingerprint == "fm-v00000001"
            assert reply.choices[0].message.content == expected["fm-v00000001"][PROMPTS[0]]
            names = [m["id"] for m in httpx.get(upstream.url + "/v1/models").json()["data"]]
            assert names == ["fleetmind", "fleetmind-v00000001"]

            point_current(site, 2)  # the proxy loads 2 upstream and unloads 1
            text, marks, usage = ask_streaming(api, PROMPTS[1], user="alice")
            assert marks == {"fm-v00000002"} and usage.completion_tokens > 0
            assert text == expected["fm-v00000002"][PROMPTS[1]]
            eventually(lambda: [m["id"] for m in httpx.get(upstream.url + "/v1/models").json()[
                "data"]] == ["fleetmind", "fleetmind-v00000002"])

            sessions = stored(proxy, site)
            assert [s["messages"][1]["content"] for s in sessions] == [
                expected["fm-v00000001"][PROMPTS[0]], expected["fm-v00000002"][PROMPTS[1]]]

            # The upstream forgets the adapter (a restart): the proxy loads it again.
            for streamed in (False, True):
                assert httpx.post(upstream.url + "/v1/unload_lora_adapter",
                                  json={"lora_name": "fleetmind-v00000002"}).status_code == 200
                if streamed:
                    text, marks, _ = ask_streaming(api, PROMPTS[2])
                else:
                    reply = ask(api, PROMPTS[2])
                    text, marks = reply.choices[0].message.content, {reply.system_fingerprint}
                assert marks == {"fm-v00000002"}
                assert text == expected["fm-v00000002"][PROMPTS[2]]


def test_a_request_that_fails_upstream_is_refused_and_not_stored(tmp_path: Path,
                                                                 adapters: Path) -> None:
    site = make_site(tmp_path, adapters)
    settings = ServeConfig(upstream="http://127.0.0.1:9", upstream_model="base",
                           data_dir=site, listen="127.0.0.1:0", upstream_timeout_s=5)
    with BackgroundServer(settings) as proxy:
        api = client(proxy)
        with pytest.raises(openai.APIStatusError) as refused:
            ask(api, PROMPTS[0], user="alice")
        assert refused.value.status_code == 502
        assert refused.value.body["code"] == "upstream_unreachable"
        with pytest.raises(openai.APIStatusError) as refused:
            ask_streaming(api, PROMPTS[0], user="alice")
        assert refused.value.status_code == 502
        assert httpx.get(proxy.url + "/ready").status_code == 503
        assert stored(proxy, site) == []


# -- refusals ----------------------------------------------------------------------------------

class GatedEngine(EmbeddedEngine):
    """The embedded engine, but a completion for user "held" waits for the test to open the
    gate: a request in flight for as long as the test needs one."""

    def __init__(self, config: ServeConfig) -> None:
        super().__init__(config, ServeMetrics())
        self.gate = threading.Event()
        self.waiting = threading.Semaphore(0)

    async def _hold(self, request) -> None:
        if request.user == "held":
            self.waiting.release()
            while not self.gate.is_set():
                await asyncio.sleep(0.01)

    async def complete(self, request, served):
        await self._hold(request)
        return await super().complete(request, served)

    async def stream(self, request, served):
        chunks = super().stream(request, served)
        yield await anext(chunks)  # the first chunk, then wait at the gate
        await self._hold(request)
        async for chunk in chunks:
            yield chunk


def test_every_refusal_has_its_status_and_openai_shape(tmp_path: Path, adapters: Path,
                                                       toy_model_dir: Path) -> None:
    site = make_site(tmp_path, adapters)
    settings = config(toy_model_dir, data_dir=site, max_concurrency=2, max_request_bytes=8192,
                      max_tokens=64)
    engine = GatedEngine(settings)
    with BackgroundServer(settings, engine=engine) as server:
        api = client(server)
        url = server.url + "/v1/chat/completions"

        def refused(body: object, status: int, code: str | None = None, raw: bytes = b""
                    ) -> dict:
            reply = httpx.post(url, content=raw or json.dumps(body).encode(),
                               headers={"content-type": "application/json"})
            assert reply.status_code == status, reply.text
            error = reply.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"]
            if code is not None:
                assert error["code"] == code
            return error

        good = {"model": "fleetmind", "messages": [{"role": "user", "content": "hi"}]}
        refused(None, 400, "invalid_json", raw=b"{not json")
        refused([1, 2], 400)
        refused({"messages": good["messages"]}, 400, "missing_required_parameter")
        refused({"model": "fleetmind", "messages": []}, 400)
        error = refused({"model": "fleetmind", "messages": [{"role": "robot", "content": "x"}]},
                        400)
        assert "messages[0].role='robot'" in error["message"]
        refused({**good, "n": 2}, 400, "unsupported_value")
        refused({**good, "temperature": 7}, 400, "invalid_value")
        refused({**good, "max_tokens": 1000}, 400, "invalid_value")
        refused({**good, "model": "gpt-4o"}, 404, "model_not_found")
        big = {"model": "fleetmind", "messages": [{"role": "user", "content": "x" * 9000}]}
        refused(big, 413, "request_too_large")
        long_prompt = {**good, "messages": [{"role": "user", "content": "moukrain " * 600}]}
        # Under the body cap, over the model's context.
        assert len(json.dumps(long_prompt)) < settings.max_request_bytes
        refused(long_prompt, 400, "context_length_exceeded")
        assert httpx.get(server.url + "/nowhere").json()["error"]["message"]

        # Over capacity: two requests in flight (held at the gate), the third is refused.
        with ThreadPoolExecutor(2) as pool:
            held = [pool.submit(ask, api, PROMPTS[i], user="held") for i in range(2)]
            for _ in range(2):
                assert engine.waiting.acquire(timeout=30)
            with pytest.raises(openai.RateLimitError) as limited:
                ask(api, PROMPTS[2], user="alice")
            assert limited.value.status_code == 429
            assert limited.value.response.headers["retry-after"] == "1"
            engine.gate.set()
            assert all(f.result().choices[0].message.content for f in held)
        metrics = httpx.get(server.url + "/metrics").text
        assert 'fleetmind_serve_requests_total{status="429"} 1.0' in metrics
        assert 'fleetmind_serve_requests_total{status="413"} 1.0' in metrics
        # Only the two answered requests were stored.
        assert sorted(s["messages"][0]["content"] for s in stored(server, site)) == \
            sorted(PROMPTS[:2])


# -- settings ----------------------------------------------------------------------------------

def test_a_site_config_file_sets_the_endpoint(tmp_path: Path, toy_model_dir: Path) -> None:
    from fleetmind.client.serve.cli import duration_s
    from fleetmind.client.serve.settings import ServeConfigError

    path = tmp_path / "site.toml"
    path.write_text(f'name = "s1"\ndata_dir = "data"\nmodel_dir = "{toy_model_dir}"\n'
                    'aggregator = "127.0.0.1:1"\n[serve]\nlisten = "0.0.0.0:9000"\n'
                    'ttl_s = 3600\ntools = "drop"\n')
    loaded = ServeConfig.load(path, listen="127.0.0.1:0")
    assert (loaded.data_dir, loaded.model_dir) == (tmp_path / "data", toy_model_dir)
    assert (loaded.listen, loaded.ttl_s, loaded.tools) == ("127.0.0.1:0", 3600, "drop")
    path.write_text(f'model_dir = "{toy_model_dir}"\n[serve]\nlisten_on = "x"\n')
    with pytest.raises(ServeConfigError, match=r"unknown \[serve\] setting\(s\) \['listen_on'\]"):
        ServeConfig.load(path)
    for bad, says in (({"max_concurrency": 0}, "max_concurrency=0"),
                      ({"listen": "nowhere"}, "listen='nowhere'"),
                      ({"dtype": "int4"}, "dtype='int4'"),
                      ({"upstream": "ftp://x"}, "upstream='ftp://x'"),
                      ({"model_dir": tmp_path}, "no config.json")):
        with pytest.raises(ServeConfigError, match=re.escape(says)):
            ServeConfig(**{"model_dir": toy_model_dir, **bad})
    assert [duration_s(t) for t in ("90", "90m", "12h", "30d")] == [90, 5400, 43200, 2592000]


def test_capture_applies_the_ttl(tmp_path: Path) -> None:
    from fleetmind.client.serve.capture import Capture

    with SessionStore(tmp_path) as store:
        store.add({"id": "old", "messages": [{"role": "user", "content": "q"}]})
        store._db.execute("UPDATE sessions SET added_at = added_at - 7200")
        store.add({"id": "new", "messages": [{"role": "user", "content": "r"}]})
    metrics = ServeMetrics()
    capture = Capture(tmp_path, metrics, ttl_s=3600)
    capture.start()
    eventually(lambda: metrics.expired._value.get() == 1)
    capture.close()
    with SessionStore(tmp_path) as store:
        assert [s.id for s in store] == ["new"]


def test_a_client_that_hangs_up_mid_stream_frees_its_slot_and_is_not_stored(
        tmp_path: Path, adapters: Path, toy_model_dir: Path) -> None:
    site = make_site(tmp_path, adapters)
    settings = config(toy_model_dir, data_dir=site, max_concurrency=1)
    engine = GatedEngine(settings)
    with BackgroundServer(settings, engine=engine) as server:
        body = {"model": "fleetmind", "stream": True, "user": "held",
                "messages": [{"role": "user", "content": PROMPTS[0]}]}
        with httpx.Client(base_url=server.url) as http, \
                http.stream("POST", "/v1/chat/completions", json=body) as reply:
            assert reply.status_code == 200
            assert next(reply.iter_lines()).startswith("data: ")
            assert engine.waiting.acquire(timeout=30)  # in flight, held at the gate
        # The connection is closed: the stream is cancelled and its slot comes back.
        engine.gate.set()
        eventually(lambda: 'status="499"' in httpx.get(server.url + "/metrics").text)
        assert ask(client(server), PROMPTS[1], user="alice").choices
        assert [s["messages"][0]["content"] for s in stored(server, site)] == [PROMPTS[1]]
