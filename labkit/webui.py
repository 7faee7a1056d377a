"""Open WebUI, the chat front end most Ollama users run, in front of the lab's servers (chapter 02; ``make webui``).

>>> with start_lab() as lab:                                   # doctest: +SKIP
...     print(lab.webui.base_url)      # open it in a browser: the bundled models are in its model list

Open WebUI lives in an environment of its own (``.venv-webui``, built by ``scripts/setup_webui.sh`` from
``requirements/lock-webui.txt``: ``make webui`` the first time, or ``WITH_WEBUI=1 make setup``), because its
pins conflict with the lab's. :func:`start` runs its ``open-webui serve`` under labkit's supervisor (the same
start, readiness wait, log and clean-up as :func:`labkit.serve`: stopped with its whole process group, also
when the owner dies), bound to 127.0.0.1, with the settings of :func:`environment`:

* offline (``OFFLINE_MODE``): no update check, no model or asset download at start; its retrieval embedding
  model is the lab's bundled MiniLM folder (``RAG_EMBEDDING_MODEL``) instead of a hub download;
* **no login** (``WEBUI_AUTH=False``): right for one person on loopback, wrong for anything shared;
* its data (SQLite database, uploads, vector store) in a folder under ``build/``;
* the environment's settings win at every start (``ENABLE_PERSISTENT_CONFIG=False``): the lab's servers get
  a new free port each time, and Open WebUI would otherwise keep the first start's URLs in its database.

:func:`start_lab` also starts the servers it talks to — the Ollama-compatible server (``OLLAMA_BASE_URL``) and
``llama-server`` as an OpenAI connection (``OPENAI_API_BASE_URLS``) — and stops all three together.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .env import REPO_ROOT, free_port, is_loopback
from .errors import EngineNotInstalledError
from .servers import Server, _start, serve  # labkit.serve's own start step: same supervisor, readiness wait, log

VERSION = "0.12.4"
ENV_LINK = REPO_ROOT / ".venv-webui"
DATA_DIR = REPO_ROOT / "build" / "webui"
READY_PATH = "/health"
START_TIMEOUT_S = 300          # first start on 2 cores: imports and database migrations take about a minute
# headless Debian chromium as tests/test_browser.py drives it (Playwright's own browser download is not used)
BROWSER_ARGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync")
INSTALL_HINT = "make webui (installs it into .venv-webui once, then starts it) or WITH_WEBUI=1 make setup"


def program(env: Path | None = None) -> Path:
    """The ``open-webui`` command of the lab's Open WebUI environment, or an error saying how to install it."""
    exe = Path(env or ENV_LINK) / "bin" / "open-webui"
    if not exe.is_file():
        raise EngineNotInstalledError(
            f"Open WebUI is not installed ({exe} is missing): it has an environment of its own. "
            f"Install it with: {INSTALL_HINT}.")
    return exe


def installed_version(env: Path | None = None) -> str | None:
    """The version of ``open-webui`` installed in ``env`` (from its dist-info folder), None when absent."""
    for info in sorted(Path(env or ENV_LINK).glob("lib/python*/site-packages/open_webui-*.dist-info")):
        return info.name[len("open_webui-"):-len(".dist-info")]
    return None


def _url(target: Server | str | None) -> str | None:
    return target.base_url if isinstance(target, Server) else (target.rstrip("/") if target else None)


def environment(ollama: Server | str | None, openai: Server | str | None, data_dir: Path,
                embedding_model: Path | str | None, secret_key: str, openai_key: str | None = None,
                max_tokens: int = 256, task_max_tokens: int = 48) -> dict[str, str]:
    """The variables Open WebUI 0.12.4 reads (its ``open_webui/env.py`` and ``config.py``) for the lab's set-up.

    ``ollama``/``openai``: a :class:`~labkit.servers.Server` or a base URL without ``/v1``; None turns that
    connection off. ``embedding_model``: a local sentence-transformers folder (None: retrieval embedding off).
    """
    ollama_url, openai_url = _url(ollama), _url(openai)
    if ollama_url is None and openai_url is None:
        raise ValueError("Open WebUI needs at least one server to talk to: pass ollama= and/or openai= "
                         "(a labkit Server or a URL such as http://127.0.0.1:11434).")
    env = {
        "DATA_DIR": str(data_dir),
        "WEBUI_AUTH": "False",                  # no login: one person on loopback (see the module's docstring)
        "WEBUI_SECRET_KEY": secret_key,         # signs its session tokens; else it writes a key file into the cwd
        "OFFLINE_MODE": "true",                 # sets HF_HUB_OFFLINE and turns the version check off
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "ENABLE_PERSISTENT_CONFIG": "False",    # these settings win at every start (new ports each time)
        "ANONYMIZED_TELEMETRY": "False", "DO_NOT_TRACK": "true", "SCARF_NO_ANALYTICS": "true",
        # Open WebUI 0.12 attaches its built-in tools (memory, chat search, ...) to every chat in "native" function
        # calling; a model without the tools capability (the bundled SmolLM2) is then refused with a 400 by Ollama and
        # by the lab's server alike. "legacy" sends plain chats. max_tokens (Ollama's num_predict): without it a small
        # model can ramble to the end of its context on a CPU, holding the server's one slot.
        "DEFAULT_MODEL_PARAMS": json.dumps({"function_calling": "legacy", "max_tokens": max_tokens}),
        # the background title / tags / follow-up requests: Open WebUI's default is max_tokens 1000 each
        "TASK_MODEL_PARAMS": json.dumps({"max_tokens": task_max_tokens}),
        "ENABLE_OLLAMA_API": "True" if ollama_url else "False",
        "ENABLE_OPENAI_API": "True" if openai_url else "False",
    }
    if ollama_url:
        env["OLLAMA_BASE_URL"] = env["OLLAMA_BASE_URLS"] = ollama_url
    if openai_url:
        key = openai_key or (openai.api_key if isinstance(openai, Server) and openai.api_key else "no-key-needed")
        env["OPENAI_API_BASE_URL"] = env["OPENAI_API_BASE_URLS"] = openai_url + "/v1"
        env["OPENAI_API_KEY"] = env["OPENAI_API_KEYS"] = key
    if embedding_model:
        env["RAG_EMBEDDING_MODEL"] = str(embedding_model)
        env["SENTENCE_TRANSFORMERS_HOME"] = str(Path(data_dir) / "cache" / "embedding")
    else:
        env["BYPASS_EMBEDDING_AND_RETRIEVAL"] = "True"
    return env


def start(ollama: Server | str | None = None, openai: Server | str | None = None, *,
          data_dir: str | os.PathLike | None = None, host: str = "127.0.0.1", port: int | None = None,
          embedding_model: str | os.PathLike | None = "minilm", ready_timeout: float = START_TIMEOUT_S,
          env: Path | None = None) -> Server:
    """Start Open WebUI pointed at ``ollama`` and/or ``openai`` and return its running :class:`~labkit.servers.Server`.

    ``data_dir`` defaults to ``build/webui``; ``embedding_model`` is a bundled name or a folder (None: off).
    Open WebUI has no login here, so it binds loopback only: any other ``host`` is refused.
    """
    exe = program(env)
    if not is_loopback(host):
        raise ValueError(f"Open WebUI runs here without a login (WEBUI_AUTH=False), so it binds loopback only, "
                         f"not {host!r}. To share it, run Open WebUI with authentication on (its own docs).")
    folder = Path(data_dir) if data_dir else DATA_DIR
    folder.mkdir(parents=True, exist_ok=True)
    if embedding_model and not Path(embedding_model).exists():
        from . import models
        embedding_model = models.get(str(embedding_model))
    extra = environment(ollama, openai, folder.resolve(), embedding_model, secrets.token_hex(32))
    p = port or free_port(host)
    argv = [str(exe), "serve", "--host", host, "--port", str(p)]
    return _start("open-webui", "open-webui", host, p, None, argv, extra, READY_PATH, ready_timeout)


def client(base_url: str, timeout: float = 120.0):
    """An ``httpx.Client`` on Open WebUI's API, signed in. With ``WEBUI_AUTH=False`` its sign-in route takes no
    password: it creates (at first) and signs in the one local user, ``admin@localhost``, and returns its token."""
    import httpx
    answer = httpx.post(f"{base_url}/api/v1/auths/signin", json={"email": "", "password": ""}, timeout=timeout)
    answer.raise_for_status()
    token = answer.json()["token"]
    return httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout)


@dataclass
class BrowserChat:
    """What :func:`chat_in_browser` saw in the page."""

    model_list: list[str]              # the model selector's entries
    reply: str                         # the first chat's answer, complete
    partial_texts: list[str]           # that answer as the page showed it while it streamed in (distinct states)
    stopped_text: str | None           # the second answer when Stop was pressed mid-reply
    next_reply: str                    # the third answer, after the stop
    next_reply_seconds: float          # from sending the third message to its complete answer
    screenshot: Path


_LAST_ANSWER = "() => { const a = document.querySelectorAll('.chat-assistant #response-content-container');" \
               " return a.length ? a[a.length - 1].innerText : ''; }"
_ANSWERS = "() => document.querySelectorAll('.chat-assistant #response-content-container').length"
# an answer is complete when Open WebUI shows its actions (rendered once the message is done)
_LAST_DONE = "() => { const a = document.querySelectorAll('.chat-assistant');" \
             " return a.length > 0 && !!a[a.length - 1].querySelector('#continue-response-button'); }"


def _send(page, text: str) -> None:
    page.locator("#chat-input").click()
    page.keyboard.type(text)
    page.keyboard.press("Enter")


def _watch_answer(page, count_before: int, timeout_s: float, stop_after_chars: int | None = None,
                  settle_s: float = 0.5) -> list[str]:
    """The last answer's text at every change until it is complete, or until it has ``stop_after_chars``
    characters and Stop is pressed. Complete: its actions are shown, or the Stop button has been gone for
    ``settle_s`` with the text unchanged (Open WebUI 0.12 shows Stop only while a reply streams). Polled every 50 ms."""
    page.wait_for_function(f"() => ({_ANSWERS})() > {count_before}", timeout=timeout_s * 1000)
    stop = page.locator('button[aria-label="Stop"]')
    states: list[str] = []
    quiet_since = None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = page.evaluate(_LAST_ANSWER).strip()
        if text and (not states or states[-1] != text):
            states.append(text)
            quiet_since = None
        streaming = stop.count() > 0
        if stop_after_chars is not None and len(text) >= stop_after_chars and streaming:
            stop.first.click()
            stop.first.wait_for(state="hidden", timeout=30_000)
            states.append(page.evaluate(_LAST_ANSWER).strip())
            return states
        if text and not streaming:
            quiet_since = quiet_since or time.monotonic()
        if text and (page.evaluate(_LAST_DONE) or (quiet_since and time.monotonic() - quiet_since >= settle_s)):
            final = page.evaluate(_LAST_ANSWER).strip()
            return states if states[-1] == final else [*states, final]
        time.sleep(0.05)
    raise TimeoutError(f"no complete answer in the page within {timeout_s:.0f} s (last text: {states[-1:]!r})")


def chromium() -> str | None:
    """Debian's chromium, the browser the lab drives (None when it is not installed: `make setup` as root installs it)."""
    found = shutil.which("chromium") or "/usr/bin/chromium"
    return found if Path(found).exists() else None


def chat_in_browser(base_url: str, model: str, screenshot: str | os.PathLike, *, executable: str | None = None,
                    args: tuple[str, ...] = BROWSER_ARGS, prompt: str = "What is the capital of France? Answer in one sentence.",
                    long_prompt: str = "Write a long story about a robot who learns to cook.",
                    next_prompt: str = "Say hello.", timeout_s: float = 180) -> BrowserChat:
    """Chat with ``model`` through Open WebUI's page in headless Chromium (Playwright): read the model list,
    stream a first answer, press Stop during a second one, time a third, and save a screenshot.

    Playwright's sync API refuses to run inside a running asyncio loop (a Jupyter kernel has one): there, the
    browser is driven from a worker thread."""
    import asyncio
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(1) as worker:
            return worker.submit(chat_in_browser, base_url, model, screenshot, executable=executable, args=args,
                                 prompt=prompt, long_prompt=long_prompt, next_prompt=next_prompt,
                                 timeout_s=timeout_s).result()
    from playwright.sync_api import sync_playwright
    shot = Path(screenshot)
    shot.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable or chromium(), args=list(args))
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(base_url)
            page.locator("#chat-input").wait_for(timeout=timeout_s * 1000)
            welcome = page.get_by_role("button", name="Okay, Let's Go!")   # the "what's new" dialog of a first visit
            if welcome.count():
                welcome.first.click()
            page.locator("#model-selector-model-button").click()
            page.locator("#model-selector-list").wait_for()
            models = [t.strip() for t in page.locator('#model-selector-list [role="option"]').all_inner_texts()]
            page.locator("#model-search-input").fill(model)
            page.keyboard.press("Enter")
            _send(page, prompt)
            streamed = _watch_answer(page, 0, timeout_s)
            _send(page, long_prompt)
            stopped = _watch_answer(page, 1, timeout_s, stop_after_chars=40)
            t0 = time.monotonic()
            _send(page, next_prompt)
            after = _watch_answer(page, 2, timeout_s)
            seconds = time.monotonic() - t0
            page.screenshot(path=str(shot))
        except Exception:
            page.screenshot(path=str(shot.with_suffix(".failed.png")))   # what the page showed, for the error
            raise
        finally:
            browser.close()
    return BrowserChat(models, streamed[-1] if streamed else "", streamed, stopped[-1] if stopped else None,
                       after[-1] if after else "", seconds, shot)


@dataclass(eq=False)
class WebUILab:
    """Open WebUI and the servers :func:`start_lab` started for it; :meth:`stop` stops all of them."""

    webui: Server
    ollama: Server | None = None
    llama_server: Server | None = None
    started: list[Server] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return self.webui.base_url

    def stop(self) -> None:
        """Stop Open WebUI first (it holds connections to the others), then the servers started for it."""
        self.webui.stop()
        for srv in reversed(self.started):
            srv.stop()

    def __enter__(self) -> "WebUILab":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_lab(model: str | None = None, *, ollama: Server | None = None, llama_server: Server | None = None,
              with_llama_server: bool = True, **options) -> WebUILab:
    """Open WebUI with the lab's servers behind it: the Ollama-compatible server (or ``ollama`` if given) and,
    unless ``with_llama_server=False``, ``llama-server`` as an OpenAI connection. ``options`` go to :func:`start`."""
    program(options.get("env"))           # the install hint before any server starts
    started: list[Server] = []
    try:
        if ollama is None:
            ollama = serve("ollama", model)
            started.append(ollama)
        if llama_server is None and with_llama_server:
            llama_server = serve("llama-server", model)
            started.append(llama_server)
        webui = start(ollama, llama_server, **options)
    except BaseException:
        for srv in reversed(started):
            srv.stop()
        raise
    return WebUILab(webui, ollama, llama_server, started)


def main(argv: list[str] | None = None) -> int:
    """``make webui``: Open WebUI and the lab's servers in the foreground until Ctrl-C."""
    import argparse
    parser = argparse.ArgumentParser(prog="python -m labkit.webui", description=main.__doc__)
    parser.add_argument("--model", default=None, help="model for the lab's servers (default: the bundled SmolLM2)")
    parser.add_argument("--port", type=int, default=None, help="Open WebUI's port (default: a free one)")
    parser.add_argument("--data-dir", default=None, help=f"its data folder (default: {DATA_DIR})")
    args = parser.parse_args(argv)
    try:
        lab = start_lab(args.model, port=args.port, data_dir=args.data_dir)
    except EngineNotInstalledError as exc:
        print(exc, file=sys.stderr)
        return 1
    with lab:
        print(f"Ollama-compatible server: {lab.ollama.base_url} (model {lab.ollama.model})")
        if lab.llama_server:
            print(f"llama-server (OpenAI connection): {lab.llama_server.base_url}/v1")
        print(f"Open WebUI {installed_version() or ''} started in {lab.webui.ready_seconds:.0f} s, no login: "
              f"open {lab.base_url}  (data: {args.data_dir or DATA_DIR}; Ctrl-C stops all three)", flush=True)
        try:
            while lab.webui.alive():
                time.sleep(1)
            print(lab.webui.why_stopped(), file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("stopping Open WebUI and the lab's servers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
