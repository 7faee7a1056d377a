"""labkit.router against real HTTP: the fault stand-in (labkit.fault_api) in front of a real llama.cpp
server for what reaches a model, and stand-ins answering themselves for the fast policy tests."""
import os
import signal
import threading
import time

import httpx
import pytest

import labkit
from labkit.fault_api import Fault, FaultAPI, seeded_faults
from labkit.router import (
    Backend,
    CircuitBreaker,
    NoBackendError,
    PrivacyError,
    RequestRejected,
    Router,
    StreamInterrupted,
    find_pii,
)

HELLO = [{"role": "user", "content": "Say hello."}]
PII_PROMPTS = ["Write to taro.yamada@example.co.jp about the invoice.",
               "Call me on 090-1234-5678 tomorrow.",
               "My card is 4111 1111 1111 1111, is it valid?",
               "My My Number is 1234 5678 9018.",
               "I live at 東京都千代田区丸の内1-1-1."]
PLAIN_PROMPTS = ["Name a colour.", "Say hello.", "Count to three.", "The meeting on 2024-05-01 is in room 12."]


@pytest.fixture(scope="module")
def engine():
    with labkit.serve("llama.cpp", "smollm2") as srv:
        yield srv


@pytest.fixture
def stand_ins():
    """Make FaultAPI stand-ins that answer themselves; all stopped at the end of the test."""
    made = []

    def make(name, faults=(), **kw):
        made.append(FaultAPI(None, name=name, faults=faults, **kw))
        return made[-1]
    yield make
    for api in made:
        api.stop()


def backends(*apis, remote=("cloud",), timeout=5.0):
    return [Backend.from_server(a, remote=a.name in remote, timeout=timeout) for a in apis]


# --------------------------------------------------------------------------- personal data
@pytest.mark.parametrize("text, kinds", [
    (PII_PROMPTS[0], ["email"]), (PII_PROMPTS[1], ["phone"]), ("+81 90 1234 5678", ["phone"]),
    (PII_PROMPTS[2], ["card"]), ("4111 1111 1111 1112", []),            # fails the Luhn check
    (PII_PROMPTS[3], ["my_number"]), ("order 123456789012", []),        # 12 digits, wrong check digit
    (PII_PROMPTS[4], ["address"]), *((p, []) for p in PLAIN_PROMPTS)])
def test_find_pii(text, kinds):
    assert find_pii(text) == kinds


# --------------------------------------------------------------------------- fault schedule
def test_seeded_faults_are_reproducible_and_follow_the_rates():
    rates = {"503": 0.2, "429:0.1": 0.1, "drop:0": 0.1}
    a, b = seeded_faults(400, rates, seed=3), seeded_faults(400, rates, seed=3)
    assert a == b and a != seeded_faults(400, rates, seed=4)
    share = sum(str(f) == "503" for f in a) / len(a)
    assert 0.14 < share < 0.26, share
    with pytest.raises(ValueError, match="Unknown fault '200'"):
        Fault.parse("200")
    with pytest.raises(ValueError, match="sum to at most 1"):
        seeded_faults(3, {"503": 0.8, "429": 0.5})


def test_stand_in_injects_its_schedule_in_order(stand_ins):
    api = stand_ins("cloud", ["ok", "429:0.2", "503", "drop:0"])
    statuses = []
    with httpx.Client(timeout=5) as http:
        for _ in range(3):
            r = http.post(api.base_url + "/v1/chat/completions", json={"messages": HELLO})
            statuses.append((r.status_code, r.headers.get("retry-after-ms"), r.headers.get("retry-after")))
        with pytest.raises(httpx.RemoteProtocolError):
            http.post(api.base_url + "/v1/chat/completions", json={"messages": HELLO})
        assert http.get(api.base_url + "/health").status_code == 200
        api.outage(True)
        assert http.get(api.base_url + "/health").status_code == 503
    assert statuses == [(200, None, None), (429, "200", "1"), (503, None, None)]
    assert api.chat_requests == 4 and api.requests["/health"] == 2 and api.prompts == ["Say hello."] * 4


def test_stand_in_answers_without_a_delayed_ack_stall(stand_ins):
    """Headers and body leave in two writes; without TCP_NODELAY each reply waited ~40 ms (Nagle
    meeting the client's delayed ACK), which made every routing measurement 40 ms too slow."""
    api = stand_ins("cloud")
    seconds = []
    with httpx.Client(timeout=5) as http:
        for _ in range(21):
            t0 = time.perf_counter()
            http.post(api.base_url + "/v1/chat/completions", json={"messages": HELLO})
            seconds.append(time.perf_counter() - t0)
    assert sorted(seconds)[10] < 0.02, sorted(seconds)


# --------------------------------------------------------------------------- retries
def test_retries_back_off_and_honour_retry_after(stand_ins):
    cloud = stand_ins("cloud", ["503", "429:0.4", "ok"])
    with Router(backends(cloud), retries=2, backoff=0.01, max_backoff=0.05) as router:
        t0 = time.perf_counter()
        reply = router.chat(HELLO, max_tokens=4)
        elapsed = time.perf_counter() - t0
    outcomes = [a.outcome for a in reply.record.attempts]
    assert outcomes == ["503", "429", "ok"] and reply.record.backend == "cloud" and cloud.chat_requests == 3
    assert reply.record.attempts[2].waited >= 0.4 and elapsed >= 0.4    # Retry-After, not the 0.05 s backoff cap
    assert 0 < reply.record.attempts[1].waited <= 0.05


def test_without_retries_the_first_error_is_final(stand_ins):
    cloud = stand_ins("cloud", ["503", "ok"])
    with Router(backends(cloud), retries=0) as router, pytest.raises(NoBackendError, match="cloud: 503"):
        router.chat(HELLO)
    assert cloud.chat_requests == 1


def test_a_long_retry_after_moves_on_instead_of_waiting(stand_ins):
    cloud, local = stand_ins("cloud", ["429:30"]), stand_ins("local")
    with Router(backends(cloud, local), retries=3, max_retry_after=5) as router:
        t0 = time.perf_counter()
        reply = router.chat(HELLO)
    assert time.perf_counter() - t0 < 2 and reply.record.backend == "local" and cloud.chat_requests == 1


# --------------------------------------------------------------------------- circuit breaker
def test_circuit_opens_after_n_failures_and_half_opens_after_cooldown(stand_ins):
    cloud = stand_ins("cloud", ["503", "503", "503", "ok"])
    with Router(backends(cloud), breaker_failures=2, breaker_cooldown=0.5) as router:
        for _ in range(2):
            with pytest.raises(NoBackendError):
                router.chat(HELLO)
        assert router.status()["cloud"]["breaker"] == "open"
        with pytest.raises(NoBackendError, match="circuit open"):
            router.chat(HELLO)
        assert cloud.chat_requests == 2                      # an open breaker sends nothing
        time.sleep(0.55)
        with pytest.raises(NoBackendError, match="cloud: 503"):
            router.chat(HELLO)                               # the half-open trial fails: open again
        with pytest.raises(NoBackendError, match="circuit open"):
            router.chat(HELLO)
        time.sleep(0.55)
        assert router.chat(HELLO).record.backend == "cloud"   # this trial succeeds: closed
        states = [to for _, _, to in router.breakers["cloud"].transitions]
    assert states == ["open", "half-open", "open", "half-open", "closed"] and cloud.chat_requests == 4


def test_half_open_admits_one_trial_at_a_time():
    now = [0.0]
    breaker = CircuitBreaker(failures=1, cooldown=1.0, clock=lambda: now[0])
    breaker.failure()
    assert not breaker.allow()
    now[0] = 1.0
    assert breaker.allow() and not breaker.allow()          # a second caller waits for the trial's verdict
    breaker.success()
    assert breaker.state == "closed" and breaker.allow()


# --------------------------------------------------------------------------- fallback order and timeouts
def test_fallback_follows_the_configured_order(stand_ins):
    cloud, local = stand_ins("cloud", ["503"] * 4), stand_ins("local")
    with Router(backends(cloud, local)) as router:
        first = router.chat(HELLO)
    assert first.record.backend == "local" and [a.backend for a in first.record.attempts] == ["cloud", "local"]
    with Router(backends(local, cloud)) as router:
        assert router.chat(HELLO).record.backend == "local"
    assert cloud.chat_requests == 1                         # local first: the cloud was not asked
    with Router(backends(cloud, local), fallback=False) as router, pytest.raises(NoBackendError):
        router.chat(HELLO)
    assert local.chat_requests == 2 and cloud.chat_requests == 2


def test_a_slow_backend_times_out_and_the_next_one_answers(stand_ins):
    cloud, local = stand_ins("cloud", ["slow:5"]), stand_ins("local")
    with Router(backends(cloud, local, timeout=0.5)) as router:
        t0 = time.perf_counter()
        reply = router.chat(HELLO)
        elapsed = time.perf_counter() - t0
    assert [a.outcome for a in reply.record.attempts] == ["timeout", "ok"] and reply.record.backend == "local"
    assert 0.5 <= elapsed < 2.0, elapsed


def test_a_bad_request_is_not_retried_elsewhere(stand_ins):
    cloud, local = stand_ins("cloud"), stand_ins("local")
    with Router(backends(cloud, local), retries=2) as router:
        with pytest.raises(RequestRejected, match="HTTP 400.*max_tokens must be an integer"):
            router.chat(HELLO, max_tokens="lots")
    assert cloud.chat_requests == 1 and local.chat_requests == 0 and router.records[-1].outcome == "rejected"


# --------------------------------------------------------------------------- health checks
def test_health_checker_marks_a_killed_engine_unhealthy_within_the_interval(stand_ins):
    interval = 0.5
    victim, spare = labkit.serve("llama.cpp", "smollm2"), stand_ins("spare")
    try:
        victim.openai().chat.completions.create(model=victim.model, messages=HELLO, max_tokens=1)   # warm: a cold
        # first request holds the model lock that /v1/models (the probe) waits for
        with Router([Backend.from_server(victim, "victim"), *backends(spare)], health_interval=interval,
                    health_timeout=2.0) as router:
            assert router.chat(HELLO, max_tokens=2).record.backend == "victim"
            while router.status()["victim"]["healthy"] is None:
                time.sleep(0.01)
            assert router.status()["victim"]["healthy"] is True
            os.killpg(victim.pid, signal.SIGKILL)            # a crash, not a clean shutdown
            killed = time.monotonic()
            while router.status()["victim"]["healthy"] is not False and time.monotonic() - killed < 5 * interval:
                time.sleep(0.01)
            noticed = time.monotonic() - killed
            reply = router.chat(HELLO)
            assert router.status()["victim"]["healthy"] is False, router.status()
    finally:
        victim.stop()
    assert noticed <= interval + 0.2, noticed
    assert reply.record.backend == "spare" and reply.record.attempts[0].outcome == "skipped: unhealthy"
    assert reply.record.tries == 1                            # the dead engine was not even tried
    assert not [t for t in threading.enumerate() if t.name.startswith("health ")]    # close() stopped the checker


# --------------------------------------------------------------------------- privacy, against a real engine
def test_personal_data_never_reaches_the_remote_backend(engine):
    with FaultAPI(engine, name="cloud") as cloud, \
            Router([Backend.from_server(cloud, remote=True), Backend.from_server(engine, "local")]) as router:
        served = {p: router.chat([{"role": "user", "content": p}], max_tokens=4, temperature=0)
                  for p in PII_PROMPTS + PLAIN_PROMPTS}
    assert cloud.chat_requests == len(PLAIN_PROMPTS) and sorted(cloud.prompts) == sorted(PLAIN_PROMPTS)
    assert all(served[p].record.backend == "local" and served[p].record.pii for p in PII_PROMPTS)
    assert all(served[p].record.backend == "cloud" and served[p].text for p in PLAIN_PROMPTS)


def test_personal_data_with_only_remote_backends_is_refused(stand_ins):
    cloud = stand_ins("cloud")
    with Router(backends(cloud)) as router, pytest.raises(PrivacyError, match=r"personal data \(email\)"):
        router.chat([{"role": "user", "content": "Mail me at a.b@example.com"}])
    assert cloud.chat_requests == 0 and router.records[-1].outcome == "refused"


# --------------------------------------------------------------------------- streaming, against a real engine
def test_a_stream_dropped_before_the_first_token_fails_over(engine):
    with FaultAPI(engine, name="cloud", faults=["drop:0"]) as cloud, \
            Router([Backend.from_server(cloud, remote=True), Backend.from_server(engine, "local")]) as router:
        stream = router.chat(HELLO, stream=True, max_tokens=6)
        text = "".join(stream)
    assert text and stream.record.outcome == "ok" and stream.record.backend == "local"
    assert [(a.backend, a.outcome) for a in stream.record.attempts] == [("cloud", "dropped"), ("local", "ok")]


def test_a_stream_broken_mid_way_raises_naming_backend_and_chunks(engine):
    with FaultAPI(engine, name="cloud", faults=["drop:3"]) as cloud, \
            Router([Backend.from_server(cloud, remote=True), Backend.from_server(engine, "local")]) as router:
        stream = router.chat(HELLO, stream=True, max_tokens=8)
        received = []
        with pytest.raises(StreamInterrupted) as info:
            for piece in stream:
                received.append(piece)
    err = info.value
    assert err.backend == "cloud" and err.chunks == len(received) >= 1 and err.text == "".join(received)
    assert f"after {err.chunks} chunk(s)" in str(err) and "'cloud'" in str(err)
    assert stream.record.outcome == "interrupted" and router.records[-1] is stream.record
