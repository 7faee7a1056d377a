"""A router in front of several OpenAI-compatible backends: health checks, retries, a circuit
breaker, fallback and a privacy rule (chapter 09).

>>> router = Router([Backend.from_server(cloud, remote=True), Backend.from_server(local)],  # doctest: +SKIP
...                 retries=2, breaker_failures=3, health_interval=0.5)
>>> reply = router.chat([{"role": "user", "content": "Hi"}], max_tokens=8)             # doctest: +SKIP
>>> reply.text, reply.record.backend, reply.record.attempts                             # doctest: +SKIP

Each policy can be switched off, so a chapter can measure what it buys:

* **health checks** (``health_interval=s``): one thread per backend probes its health URL every
  ``s`` seconds; a backend whose probe fails (refused, an error status, or no answer within
  ``health_timeout``) is skipped until a probe succeeds again;
* **timeouts** (``Backend.timeout``): the longest a backend may stay silent — connect, first
  byte, or between two stream events;
* **retries** (``retries=n``): up to ``n`` more attempts on the same backend after a 429, 408, 409,
  5xx, timeout or broken connection, waiting an exponential backoff with full jitter
  (``backoff`` × 2^k, capped at ``max_backoff``) — and never less than the backend asked for:
  ``retry-after-ms``, then ``Retry-After`` (the order the OpenAI SDK reads them). A backend that
  asks for more than ``max_retry_after`` is not retried; the router moves on;
* **a circuit breaker** per backend (``breaker_failures=n``): after ``n`` failed attempts in a row
  it *opens* and the backend is skipped without a request; after ``breaker_cooldown`` seconds it
  is *half-open* and lets one trial request through: success closes it, failure opens it again;
* **fallback** (``fallback=True``): backends are tried in the order given; without it only the
  first eligible one is;
* **privacy** (``privacy=True``): a request whose messages contain personal data (:func:`find_pii`:
  emails, phone numbers, card numbers passing the Luhn check, 12-digit Japanese My Number IDs
  passing their check digit, Japanese addresses) goes to local backends only — never to a
  backend marked ``remote=True`` — and is refused with :class:`PrivacyError` if none is left.
  This is a rule applied *before* routing, not a fallback: a design that tries the cloud first and
  falls back to local "for privacy" has already sent the data.

Streaming (``stream=True``): the router opens the stream and fails over, like any failure, until a
backend delivers the first piece of content; from then on the caller holds real text, so a
failure raises :class:`StreamInterrupted` naming the backend and how many chunks arrived — a
stream is never cut short silently, and a stream that ends without ``[DONE]`` counts as cut.

Every request leaves a :class:`RouteRecord` (``router.records``): which backend served it, every
attempt with its outcome and wait, the latency, the outcome, and which kinds of personal data were
found (the kinds, never the values).

**Library or hand-written?** Retries use ``tenacity`` (pinned in the lock): ``Retrying`` with
``stop_after_attempt``, a ``retry_if_exception`` predicate and ``wait_random_exponential`` (the
"full jitter" backoff) are the parts people get wrong by hand — an extra sleep after the last
attempt, an off-by-one in the attempt count, jitter forgotten so that every client retries in
lockstep — and tenacity has them tested. We only add a wait that honours the server's own
``Retry-After``. The circuit breaker is written here (~50 lines): tenacity has none, the libraries
that do (``pybreaker``, ``aiobreaker``) are not in the lock, and the router needs the breaker's
state *before* a request (to skip an open backend without spending an attempt), which a
decorator-style breaker hides. Health checks are a thread per backend and an HTTP GET.
"""
from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field

from . import engines
from .errors import LabkitError

RETRYABLE_STATUS = (408, 409, 429, 500, 502, 503, 504)
CALLER_ERRORS = (400, 413, 422)          # the request itself is wrong: every backend would refuse it


# --------------------------------------------------------------------------- personal data
def luhn_ok(digits: str) -> bool:
    """The Luhn checksum every payment card number satisfies.

    >>> luhn_ok("4111111111111111"), luhn_ok("4111111111111112")
    (True, False)
    """
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def my_number_ok(digits: str) -> bool:
    """The check digit of a Japanese Individual Number (マイナンバー, 12 digits): weights 2–7 then 2–6
    from the right over the first 11 digits, remainder mod 11, check = 0 if it is ≤ 1 else 11 − it.

    >>> my_number_ok("123456789018"), my_number_ok("123456789012")
    (True, False)
    """
    if len(digits) != 12 or not digits.isdigit():
        return False
    body = [int(d) for d in reversed(digits[:11])]
    remainder = sum(p * (n + 1 if n <= 6 else n - 5) for n, p in enumerate(body, 1)) % 11
    return int(digits[11]) == (0 if remainder <= 1 else 11 - remainder)


_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_PHONE = re.compile(r"(?<![\d-])(?:\+\d{1,3}[ -]?\(?\d{1,4}\)?(?:[ -]?\d{2,4}){2,3}"   # +81 90 1234 5678
                    r"|0\d{1,4}-\d{1,4}-\d{3,4}"                                       # 03-1234-5678
                    r"|0[5789]0\d{8}"                                                  # 09012345678
                    r"|\(\d{3}\) ?\d{3}-\d{4})(?![\d-])")                              # (555) 123-4567
_DIGIT_RUN = re.compile(r"(?<!\d)\d(?:[ -]?\d){11,18}(?!\d)")                          # 12-19 digits
_JP_ADDRESS = re.compile(r"(?:東京都|北海道|(?:京都|大阪)府|[\u4e00-\u9fff]{2,3}県)[\u4e00-\u9fff\u3040-\u30ff]{1,12}?"
                         r"[市区町村郡]|〒\s?\d{3}-\d{4}")


def find_pii(text: str) -> list[str]:
    """Kinds of personal data in ``text`` (sorted, each once): "email", "phone", "card",
    "my_number", "address". Patterns, not understanding: names and free-form addresses outside
    Japan's prefecture format pass unnoticed, so treat this as a floor, not a guarantee.

    >>> find_pii("Mail taro@example.co.jp or call 090-1234-5678; card 4111 1111 1111 1111.")
    ['card', 'email', 'phone']
    >>> find_pii("The 2024-05-01 meeting is in room 12.")
    []
    """
    kinds = set()
    if _EMAIL.search(text):
        kinds.add("email")
    if _PHONE.search(text):
        kinds.add("phone")
    for match in _DIGIT_RUN.finditer(text):
        digits = re.sub(r"\D", "", match.group())
        if 13 <= len(digits) <= 19 and luhn_ok(digits):
            kinds.add("card")
        elif len(digits) == 12 and my_number_ok(digits):
            kinds.add("my_number")
    if _JP_ADDRESS.search(text):
        kinds.add("address")
    return sorted(kinds)


def messages_text(messages) -> str:
    """All text in OpenAI-style chat messages (string contents and text parts)."""
    lines = []
    for message in messages or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            lines.append(content)
        elif isinstance(content, list):
            lines += [part.get("text", "") for part in content if isinstance(part, dict)]
    return "\n".join(lines)


# --------------------------------------------------------------------------- errors
class RouterError(LabkitError, RuntimeError):
    """Base class of the router's errors."""


class BackendError(RouterError):
    """One attempt on one backend failed (status, timeout, broken connection, bad reply)."""

    def __init__(self, backend: str, outcome: str, detail: str, *, retryable: bool = True,
                 retry_after: float | None = None):
        super().__init__(f"backend {backend!r}: {outcome} ({detail})")
        self.backend, self.outcome, self.retryable, self.retry_after = backend, outcome, retryable, retry_after


class RequestRejected(RouterError):
    """A backend answered 400/413/422: the request itself is wrong, so no other backend is tried."""


class NoBackendError(RouterError):
    """Every eligible backend failed or was skipped; ``record`` has each attempt."""

    def __init__(self, message: str, record: "RouteRecord"):
        super().__init__(message)
        self.record = record


class PrivacyError(NoBackendError):
    """A request with personal data and no local backend left to take it: refused, not sent remote."""


class StreamInterrupted(RouterError):
    """A stream broke after content reached the caller (not retried: the caller has partial text)."""

    def __init__(self, backend: str, chunks: int, text: str, cause: str):
        super().__init__(f"The stream from backend {backend!r} broke after {chunks} chunk(s) "
                         f"({len(text)} characters) had arrived: {cause}. The reply is incomplete; "
                         "retry the whole request.")
        self.backend, self.chunks, self.text = backend, chunks, text


# --------------------------------------------------------------------------- backends
@dataclass
class Backend:
    """One OpenAI-compatible server. ``base_url`` without ``/v1``; ``remote=True`` for anything that
    leaves this machine (a hosted API); ``timeout``: the longest silence tolerated, in seconds."""

    name: str
    base_url: str
    model: str
    remote: bool = False
    timeout: float = 30.0
    health_path: str = "/health"
    api_key: str | None = None

    @classmethod
    def from_server(cls, server, name: str | None = None, *, remote: bool = False, timeout: float = 30.0) -> "Backend":
        """A backend for a :class:`labkit.Server` or a :class:`labkit.fault_api.FaultAPI`."""
        engine = getattr(server, "engine", "")
        known = engine in engines.names()
        health = getattr(server, "health_path", None) or (known and engines.get(engine).health_path) or "/health"
        return cls(name or getattr(server, "name", None) or f"{engine}:{server.port}", server.base_url,
                   server.model, remote, timeout, health, getattr(server, "api_key", None))

    @classmethod
    def hosted(cls, environ=None, *, name: str = "hosted", timeout: float = 30.0) -> "Backend | None":
        """A real hosted OpenAI-compatible API from the environment, or ``None`` when ``OPENAI_API_KEY`` is unset.

        ``OPENAI_BASE_URL`` (default ``https://api.openai.com/v1``) must end in ``/v1``, as OpenAI's
        SDK expects; ``OPENAI_MODEL`` names the model (default ``gpt-4o-mini``). Always ``remote``;
        its health probe is ``/v1/models``, sent with the key.
        """
        import os
        environ = os.environ if environ is None else environ
        key = environ.get("OPENAI_API_KEY", "").strip()
        if not key:
            return None
        url = environ.get("OPENAI_BASE_URL", "").strip().rstrip("/") or "https://api.openai.com/v1"
        if not re.fullmatch(r"https?://\S+/v1", url):
            raise ValueError(f"OPENAI_BASE_URL must be an http(s) URL ending in /v1 (the router adds "
                             f"/v1/chat/completions to what comes before); got {url!r}")
        model = environ.get("OPENAI_MODEL", "").strip() or "gpt-4o-mini"
        return cls(name, url[:-3], model, remote=True, timeout=timeout, health_path="/v1/models", api_key=key)


class CircuitBreaker:
    """closed → (``failures`` failed attempts in a row) → open → (``cooldown`` s) → half-open, where
    one trial request decides: success closes, failure opens again. ``transitions`` keeps the history."""

    def __init__(self, failures: int, cooldown: float, clock=time.monotonic):
        if failures < 1 or cooldown < 0:
            raise ValueError(f"A circuit breaker needs failures >= 1 and cooldown >= 0; got {failures}, {cooldown}.")
        self.failures, self.cooldown, self.clock = failures, cooldown, clock
        self.state, self.consecutive, self.opened_at = "closed", 0, 0.0
        self.transitions: list[tuple[float, str, str]] = []
        self._trial_in_flight = False
        self._lock = threading.Lock()

    def _move(self, state: str) -> None:
        self.transitions.append((self.clock(), self.state, state))
        self.state = state

    def allow(self) -> bool:
        """May a request go to this backend now? (Half-open admits one trial at a time.)"""
        with self._lock:
            if self.state == "open" and self.clock() - self.opened_at >= self.cooldown:
                self._move("half-open")
            if self.state == "closed":
                return True
            if self.state == "half-open" and not self._trial_in_flight:
                self._trial_in_flight = True
                return True
            return False

    def success(self) -> None:
        with self._lock:
            self.consecutive, self._trial_in_flight = 0, False
            if self.state != "closed":
                self._move("closed")

    def failure(self) -> None:
        with self._lock:
            self.consecutive += 1
            self._trial_in_flight = False
            if self.state == "half-open" or (self.state == "closed" and self.consecutive >= self.failures):
                self.opened_at = self.clock()
                self._move("open")


class HealthChecker:
    """A thread per backend probing ``base_url + health_path`` every ``interval`` seconds."""

    def __init__(self, backends: list[Backend], interval: float, timeout: float):
        import httpx
        if interval <= 0:
            raise ValueError(f"health_interval must be > 0 seconds; got {interval}.")
        self.interval, self.timeout = interval, timeout
        self.status = {b.name: {"healthy": None, "since": time.monotonic(), "checked": None, "error": None,
                                "probes": 0} for b in backends}
        self._stop = threading.Event()
        self._client = httpx.Client(timeout=timeout)
        self._threads = [threading.Thread(target=self._loop, args=(b,), daemon=True, name=f"health {b.name}")
                         for b in backends]
        for t in self._threads:
            t.start()

    def _probe(self, backend: Backend) -> str | None:
        """None when healthy, else why not."""
        import httpx
        headers = {"Authorization": f"Bearer {backend.api_key}"} if backend.api_key else {}
        try:
            r = self._client.get(backend.base_url + backend.health_path, headers=headers)
            return None if r.status_code == 200 else f"HTTP {r.status_code}"
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"

    def _loop(self, backend: Backend) -> None:
        while not self._stop.is_set():
            error = self._probe(backend)
            now = time.monotonic()
            entry = self.status[backend.name]
            if entry["healthy"] != (error is None):
                entry["since"] = now
            entry.update(healthy=error is None, checked=now, error=error, probes=entry["probes"] + 1)
            self._stop.wait(self.interval)

    def healthy(self, name: str) -> bool:
        """False only when the last probe failed (not yet probed counts as healthy)."""
        return self.status[name]["healthy"] is not False

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.timeout + 1)
        self._client.close()


# --------------------------------------------------------------------------- records
@dataclass
class Attempt:
    backend: str
    outcome: str             # "ok", "429", "503", "timeout", "connection", "dropped", "skipped: ..."
    seconds: float = 0.0
    waited: float = 0.0      # backoff slept before this attempt


@dataclass
class RouteRecord:
    backend: str | None = None           # who served it (None: nobody)
    outcome: str = "pending"             # "ok", "failed", "refused" (privacy), "interrupted", "rejected"
    latency: float = 0.0
    pii: list[str] = field(default_factory=list)
    stream: bool = False
    attempts: list[Attempt] = field(default_factory=list)
    error: str | None = None

    @property
    def tries(self) -> int:
        """Requests actually sent (skipped backends not counted)."""
        return sum(not a.outcome.startswith("skipped") for a in self.attempts)


@dataclass
class Reply:
    """A routed non-streaming reply: the backend's JSON and the record of how it was served."""

    data: dict
    record: RouteRecord

    @property
    def text(self) -> str:
        return self.data["choices"][0]["message"].get("content") or ""


# --------------------------------------------------------------------------- the router
class Router:
    """Routes chat requests over ``backends`` (in fallback order) with the policies in the module
    docstring. Use as a context manager, or call ``close()``: it stops the health-check threads."""

    def __init__(self, backends: list[Backend], *, retries: int = 0, backoff: float = 0.1,
                 max_backoff: float = 2.0, max_retry_after: float = 10.0, breaker_failures: int | None = None,
                 breaker_cooldown: float = 5.0, fallback: bool = True, health_interval: float | None = None,
                 health_timeout: float = 1.0, privacy: bool = True):
        import httpx
        names = [b.name for b in backends]
        if not backends or len(set(names)) != len(names):
            raise ValueError(f"A router needs at least one backend and unique names; got {names}.")
        if retries < 0:
            raise ValueError(f"retries counts extra attempts and must be >= 0; got {retries}.")
        self.backends = list(backends)
        self.retries, self.backoff, self.max_backoff, self.max_retry_after = retries, backoff, max_backoff, max_retry_after
        self.fallback, self.privacy = fallback, privacy
        self.breakers = ({b.name: CircuitBreaker(breaker_failures, breaker_cooldown) for b in backends}
                         if breaker_failures else {})
        self._clients = {b.name: httpx.Client(timeout=httpx.Timeout(b.timeout, connect=min(b.timeout, 5.0)),
                                              headers={"Authorization": f"Bearer {b.api_key}"} if b.api_key else {})
                         for b in backends}
        self.health = HealthChecker(self.backends, health_interval, health_timeout) if health_interval else None
        self.records: list[RouteRecord] = []
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ public
    def chat(self, messages: list[dict], stream: bool = False, **params):
        """Route one chat request. Returns a :class:`Reply`, or with ``stream=True`` a
        :class:`RoutedStream` (iterate it for text). Raises :class:`NoBackendError` (or
        :class:`PrivacyError`) when no backend could serve it; ``params`` go to the backend as is."""
        record = RouteRecord(stream=stream, pii=find_pii(messages_text(messages)) if self.privacy else [])
        body = {**params, "messages": messages, "stream": stream}
        t0 = time.perf_counter()
        try:
            for backend in self._candidates(record):
                if not self._admitted(backend, record):
                    continue
                try:
                    result = self._with_retries(backend, body, record)
                except BackendError:
                    continue
                record.backend = backend.name
                if stream:
                    return RoutedStream(self, backend, result, record, t0)
                record.outcome = "ok"
                return Reply(result, record)
            raise self._no_backend(record)
        except RequestRejected as exc:
            record.outcome, record.error = "rejected", str(exc)
            raise
        except NoBackendError as exc:
            record.outcome = "refused" if isinstance(exc, PrivacyError) else "failed"
            record.error = str(exc)
            raise
        finally:
            if not stream or record.outcome != "pending":
                self._finish(record, t0)

    def status(self) -> dict[str, dict]:
        """Per backend: health (None without checks or before the first probe) and breaker state."""
        out = {}
        for b in self.backends:
            health = self.health.status[b.name] if self.health else {}
            breaker = self.breakers.get(b.name)
            out[b.name] = {"remote": b.remote, "healthy": health.get("healthy"), "health error": health.get("error"),
                           "breaker": breaker.state if breaker else None}
        return out

    def summary(self) -> dict:
        """Success rate, p50/p95 latency (s) and the share of requests each backend served."""
        from .streams import percentile
        with self._lock:
            records = list(self.records)
        if not records:
            raise ValueError("No requests were routed yet: call router.chat(...) first.")
        ok = [r for r in records if r.outcome == "ok"]
        latencies = [r.latency for r in records]
        out = {"requests": len(records), "success rate": len(ok) / len(records),
               "p50 s": percentile(latencies, 50), "p95 s": percentile(latencies, 95),
               "attempts per request": sum(r.tries for r in records) / len(records),
               "with personal data": sum(bool(r.pii) for r in records)}
        for b in self.backends:
            out[f"served by {b.name}"] = sum(r.backend == b.name and r.outcome == "ok" for r in records) / len(records)
        return out

    def close(self) -> None:
        if self.health:
            self.health.stop()
        for client in self._clients.values():
            client.close()

    def __enter__(self) -> "Router":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ routing
    def _candidates(self, record: RouteRecord) -> list[Backend]:
        """Backends to try in order: local-only for personal data; only the first without fallback."""
        backends = self.backends
        if record.pii:
            backends = [b for b in backends if not b.remote]
            record.attempts += [Attempt(b.name, "skipped: remote, personal data") for b in self.backends if b.remote]
            if not backends:
                raise PrivacyError(
                    f"The request contains personal data ({', '.join(record.pii)}) and every backend is remote "
                    f"({', '.join(b.name for b in self.backends)}); refusing to send it. Add a local backend "
                    "(remote=False) or remove the personal data.", record)
        return backends if self.fallback else backends[:1]

    def _admitted(self, backend: Backend, record: RouteRecord) -> bool:
        if self.health and not self.health.healthy(backend.name):
            record.attempts.append(Attempt(backend.name, "skipped: unhealthy"))
            return False
        breaker = self.breakers.get(backend.name)
        if breaker and not breaker.allow():
            record.attempts.append(Attempt(backend.name, "skipped: circuit open"))
            return False
        return True

    def _no_backend(self, record: RouteRecord) -> NoBackendError:
        tried = "; ".join(f"{a.backend}: {a.outcome}" for a in record.attempts) or "none"
        where = "local backend" if record.pii else "backend"
        return NoBackendError(f"No {where} could serve the request (attempts: {tried}). "
                    "Check router.status() for health and breaker states.", record)

    def _finish(self, record: RouteRecord, t0: float) -> None:
        record.latency = time.perf_counter() - t0
        with self._lock:
            self.records.append(record)

    # ------------------------------------------------------------------ retries (tenacity)
    def _with_retries(self, backend: Backend, body: dict, record: RouteRecord):
        """One backend, up to 1 + retries attempts; the result of the first success, or the last
        BackendError. A breaker that opens during the retries stops them."""
        import tenacity
        breaker = self.breakers.get(backend.name)
        jitter = tenacity.wait_random_exponential(multiplier=self.backoff, max=self.max_backoff)
        pending_wait = [0.0]

        def wait(state) -> float:
            exc = state.outcome.exception()
            pending_wait[0] = max(jitter(state), exc.retry_after or 0.0)
            return pending_wait[0]

        def worth_retrying(exc: BaseException) -> bool:
            if not isinstance(exc, BackendError) or not exc.retryable:
                return False
            if exc.retry_after is not None and exc.retry_after > self.max_retry_after:
                return False                   # the backend asks for a long pause: try the next one instead
            return breaker is None or breaker.state == "closed"

        def attempt():
            waited, pending_wait[0] = pending_wait[0], 0.0
            t0 = time.perf_counter()
            try:
                result = self._send(backend, body)
            except BackendError as exc:
                record.attempts.append(Attempt(backend.name, exc.outcome, time.perf_counter() - t0, waited))
                if breaker:
                    breaker.failure()
                raise
            record.attempts.append(Attempt(backend.name, "ok", time.perf_counter() - t0, waited))
            if breaker:
                breaker.success()
            return result

        retrying = tenacity.Retrying(stop=tenacity.stop_after_attempt(1 + self.retries), wait=wait,
                                     retry=tenacity.retry_if_exception(worth_retrying), reraise=True)
        return retrying(attempt)

    # ------------------------------------------------------------------ one attempt
    def _send(self, backend: Backend, body: dict):
        """One HTTP request. A dict for a plain request; for a stream, an open :class:`_OpenStream`
        that has already received its first content (so a failure before it is a BackendError)."""
        import httpx
        client = self._clients[backend.name]
        request = client.build_request("POST", backend.base_url + "/v1/chat/completions",
                                       json={**body, "model": backend.model})
        try:
            response = client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise BackendError(backend.name, "timeout", f"no answer within {backend.timeout:g} s") from exc
        except httpx.HTTPError as exc:
            raise BackendError(backend.name, "connection", f"{type(exc).__name__}: {exc}") from exc
        if response.status_code != 200:
            _raise_for_status(backend, response)
        if body.get("stream"):
            return _OpenStream.open(backend, response)
        try:
            response.read()
            return response.json()
        except httpx.TimeoutException as exc:
            raise BackendError(backend.name, "timeout", f"the body stalled over {backend.timeout:g} s") from exc
        except (httpx.HTTPError, ValueError) as exc:
            raise BackendError(backend.name, "dropped", f"{type(exc).__name__}: {exc}") from exc
        finally:
            response.close()


def _retry_after(response) -> float | None:
    """Seconds the server asks us to wait: ``retry-after-ms`` first, then ``Retry-After`` (seconds)."""
    for header, divisor in (("retry-after-ms", 1000), ("retry-after", 1)):
        value = response.headers.get(header)
        try:
            return float(value) / divisor if value is not None else None
        except ValueError:
            continue                       # an HTTP-date or garbage: fall back to our own backoff
    return None


def _raise_for_status(backend: Backend, response) -> None:
    try:
        detail = response.read().decode(errors="replace")[:200]
    except Exception:                      # a body that breaks off is still an error status
        detail = ""
    finally:
        response.close()
    status = response.status_code
    if status in CALLER_ERRORS:
        raise RequestRejected(f"Backend {backend.name!r} refused the request with HTTP {status}: {detail}. "
                              "Every backend would: fix the request (messages, max_tokens, model parameters).")
    raise BackendError(backend.name, str(status), detail, retryable=status in RETRYABLE_STATUS,
                       retry_after=_retry_after(response) if status == 429 else None)


# --------------------------------------------------------------------------- streams
@dataclass
class _OpenStream:
    """A stream that has delivered its first content: ``pending`` deltas not yet handed out."""

    backend: Backend
    response: object
    events: object
    pending: list[str]
    done: bool = False

    @classmethod
    def open(cls, backend: Backend, response) -> "_OpenStream":
        from .streams import sse_payloads
        stream = cls(backend, response, sse_payloads(response.iter_lines()), [])
        try:
            while not stream.pending and not stream.done:
                stream._read_one()
        except Exception as exc:
            import httpx
            response.close()
            raise BackendError(backend.name, "timeout" if isinstance(exc, httpx.TimeoutException) else "dropped",
                               f"the stream broke before the first token: {type(exc).__name__}: {exc}") from exc
        return stream

    def _read_one(self) -> None:
        """Read one SSE event into ``pending``; errors for a broken or truncated stream."""
        try:
            payload = next(self.events)
        except StopIteration:
            raise ConnectionError("the stream ended without [DONE]") from None
        if payload == "[DONE]":
            self.done = True
            return
        import json
        choice = (json.loads(payload).get("choices") or [{}])[0]
        content = (choice.get("delta") or {}).get("content")
        if content:
            self.pending.append(content)


class RoutedStream:
    """Text deltas of a routed stream. ``record`` is complete once the stream is exhausted;
    a break mid-stream raises :class:`StreamInterrupted`."""

    def __init__(self, router: Router, backend: Backend, opened: _OpenStream, record: RouteRecord, t0: float):
        self.router, self.backend, self._opened, self.record, self._t0 = router, backend, opened, record, t0
        self.chunks: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self.chunks)

    def __iter__(self):
        opened = self._opened
        try:
            while True:
                while opened.pending:
                    self.chunks.append(opened.pending.pop(0))
                    yield self.chunks[-1]
                if opened.done:
                    break
                try:
                    opened._read_one()
                except Exception as exc:
                    error = StreamInterrupted(self.backend.name, len(self.chunks), self.text,
                                              f"{type(exc).__name__}: {exc}")
                    self.record.outcome, self.record.error = "interrupted", str(error)
                    raise error from exc
            self.record.outcome = "ok"
        finally:
            opened.response.close()
            if self.record.outcome == "pending":
                self.record.outcome = "interrupted"      # the caller stopped reading early
            self.router._finish(self.record, self._t0)

    def close(self) -> None:
        self._opened.response.close()
