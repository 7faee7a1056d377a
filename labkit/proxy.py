"""nginx in front of the engines: a managed reverse proxy (introduced in chapter 08).

>>> with labkit.serve("llama-server", parallel=2) as a, labkit.serve("llama-server", parallel=2) as b:  # doctest: +SKIP
...     with start_nginx([a, b], balance="least_conn", rate="10r/s", burst=5, api_key="sk-lab") as px:
...         px.openai().chat.completions.create(model=a.model, messages=[...])

:func:`start_nginx` writes an ``nginx.conf`` generated from its arguments into a fresh temporary
folder and runs ``nginx -p <folder> -c nginx.conf -g "daemon off;"`` under labkit's supervisor
(:mod:`labkit._supervisor`, through :mod:`labkit.servers`): the same guarantee as
:func:`labkit.serve` — nginx's master and workers are stopped by ``stop()``, at the end of a
``with`` block (also on an error), at interpreter exit and when the owning process dies. The pid
file, logs and temp files live in that folder (no root needed, nothing written under /etc or
/var), which is deleted when the proxy stops. It listens on a free port of 127.0.0.1.

What the generated configuration can do: ``upstream`` with ``least_conn`` or round robin;
``limit_req`` with a burst (its zone in ``http {}``, rejections answered 429 with a
``Retry-After``); an API key checked at the proxy (``Authorization: Bearer``, 401 otherwise);
``proxy_buffering on|off``; ``client_max_body_size`` (413 above it); a long
``proxy_read_timeout`` for long generations; ``/health`` passed through without key or limit;
an optional TLS listener with a self-signed certificate made by ``openssl``. Every request is
logged as one JSON line (status, the backend that answered, times): :meth:`Proxy.requests`.

:func:`nginx_test` runs ``nginx -t`` on any configuration text and returns ``(ok, message)``;
:func:`site_config` wraps a site file (what ``/etc/nginx/sites-enabled/`` holds) in the
``events``/``http`` context Debian's ``nginx.conf`` puts around it.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .env import free_port, is_loopback
from .errors import EngineNotInstalledError, ServerStartError
from .servers import FolderServer, Server, _start  # labkit.serve's own start step: same supervisor, readiness wait, log, clean-up

BALANCES = ("least_conn", "round_robin")
READY_PATH = "/nginx-ready"          # answered by nginx itself: labkit's readiness probe
INSTALL_HINT = ("Install it with `sudo apt-get install nginx` (Debian/Ubuntu; `brew install nginx` on macOS), "
                "or run `make setup` as root, which installs it. labkit starts its own nginx processes; the "
                "system service is not needed (leave it stopped).")
SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin")   # where packages put nginx; often not on a user's PATH
_KEY_PATTERN = re.compile(r"[A-Za-z0-9._~+/=-]{8,200}")


# --------------------------------------------------------------------------- the programs
def nginx_binary() -> Path:
    """Path of the nginx program: ``$LABKIT_NGINX``, ``PATH``, then /usr/sbin (not on a user's PATH)."""
    candidates = [os.environ.get("LABKIT_NGINX"), shutil.which("nginx"), *(f"{d}/nginx" for d in SBIN_DIRS)]
    for cand in candidates:
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return Path(cand)
    raise EngineNotInstalledError(f"nginx is not installed here (looked on PATH and in /usr/sbin). {INSTALL_HINT}")


@functools.lru_cache(maxsize=4)
def _version_of(binary: str) -> tuple[int, ...]:
    out = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10)
    found = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", out.stderr + out.stdout)
    return tuple(int(x) for x in found.groups()) if found else (0, 0, 0)


def nginx_version() -> str:
    """The installed nginx's version, e.g. ``"1.22.1"``."""
    return ".".join(map(str, _version_of(str(nginx_binary()))))


def _nginx_argv(prefix: Path, *extra: str) -> list[str]:
    binary = str(nginx_binary())
    argv = [binary, "-p", f"{prefix}/", "-c", str(prefix / "nginx.conf")]
    if _version_of(binary) >= (1, 19, 5):
        # -e: log start-up errors to stderr instead of the compiled-in /var/log path (unwritable without root)
        argv += ["-e", "stderr"]
    return argv + list(extra)


def self_signed_cert(folder: str | os.PathLike, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """(certificate, key) for ``host``, valid one day, made by ``openssl`` in ``folder``.

    The certificate names ``host`` (and ``localhost``) as a subjectAltName: TLS clients check that,
    not the CN. A client trusts it when given the file: ``httpx.Client(verify=cert)``.
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        raise EngineNotInstalledError("openssl is not installed: `sudo apt-get install openssl`.")
    folder = Path(folder)
    cert, key = folder / "cert.pem", folder / "key.pem"
    alt = f"IP:{host}" if re.fullmatch(r"[0-9.]+|[0-9a-fA-F:]+", host) else f"DNS:{host}"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", f"/CN={host}", "-addext", f"subjectAltName={alt},DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    key.chmod(0o600)
    return cert, key


# --------------------------------------------------------------------------- configuration
@dataclass
class ProxySettings:
    """What :func:`render_config` turns into nginx directives (all of it visible in the text)."""

    backends: list[str]                    # "host:port" of each engine server
    balance: str = "least_conn"            # or "round_robin" (nginx's default)
    rate: str | None = None                # limit_req rate, e.g. "10r/s" or "600r/m"; None: no limit
    burst: int = 0                         # requests above the rate accepted at once before 429s start
    api_keys: list[str] = field(default_factory=list)   # empty: no key needed
    buffering: bool = False                # proxy_buffering: off lets streamed tokens through at once
    honor_accel_buffering: bool = True     # False: ignore a backend's "X-Accel-Buffering: no" header
    upstream_http: str = "1.1"             # proxy_http_version: "1.0" is nginx's default (no keep-alive, no chunks)
    max_body: str = "1m"                   # client_max_body_size (nginx's own default is 1m)
    read_timeout_s: int = 600              # proxy_read_timeout: silence allowed between two upstream reads
    tls: bool = False                      # add a TLS listener (certificate: cert.pem in the prefix)

    def __post_init__(self):
        if self.balance not in BALANCES:
            raise ValueError(f"balance must be one of {', '.join(BALANCES)}; got {self.balance!r}")
        if not self.backends:
            raise ValueError("nginx needs at least one backend (host:port)")
        for key in self.api_keys:
            if not _KEY_PATTERN.fullmatch(key):
                raise ValueError("API keys are 8-200 characters of A-Z a-z 0-9 . _ ~ + / = - "
                                 "(nothing nginx would read as syntax)")
        if not re.fullmatch(r"\d+[kKmMgG]?", self.max_body):
            raise ValueError(f"max_body is nginx's size form, e.g. '16k', '10m' or '0' (no limit); got {self.max_body!r}")
        if self.upstream_http not in ("1.0", "1.1"):
            raise ValueError(f"upstream_http is '1.0' or '1.1'; got {self.upstream_http!r}")
        if self.rate is not None and not re.fullmatch(r"\d+r/[sm]", self.rate):
            raise ValueError(f"rate is nginx's form, e.g. '10r/s' or '30r/m'; got {self.rate!r}")

    @property
    def rate_per_s(self) -> float | None:
        if self.rate is None:
            return None
        n, unit = int(self.rate[:-3]), self.rate[-1]
        return n if unit == "s" else n / 60


def _upstream_block(s: ProxySettings) -> str:
    servers = "\n".join(f"        server {b};" for b in s.backends)
    method = ("least_conn;  # each request goes to the backend with the fewest open requests"
              if s.balance == "least_conn" else "# round robin (nginx's default): backends take turns")
    return f"""    upstream engines {{
        {method}
{servers}
        keepalive 16;  # reuse connections to the engines
        # ...but close idle ones before the engines do: llama-server and uvicorn drop an idle connection
        # after 5 s, and a request nginx sends on one just closed fails with 502 (POST is not retried)
        keepalive_timeout 4s;
    }}"""


def _http_preamble(s: ProxySettings) -> str:
    lines = ["    # temp files under the -p prefix: no root needed",
             *(f"    {kind}_temp_path tmp/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")),
             "    log_format labkit escape=json '{\"msec\":$msec,\"status\":$status,\"uri\":\"$uri\",'",
             "        '\"upstream\":\"$upstream_addr\",\"upstream_status\":\"$upstream_status\",'",
             "        '\"request_time\":$request_time,\"bytes_sent\":$bytes_sent}';",
             "    access_log access.log labkit;"]
    if s.rate:
        lines += ["    # the zone lives in http {}: nginx -t rejects limit_req_zone inside server {}",
                  f"    limit_req_zone $binary_remote_addr zone=api:1m rate={s.rate};",
                  "    limit_req_status 429;"]
    if s.api_keys:
        keys = "\n".join(f'        "Bearer {k}" 1;' for k in s.api_keys)
        lines += ["    map $http_authorization $api_key_ok {", "        default 0;", keys, "    }"]
    return "\n".join(lines)


def _api_location(s: ProxySettings) -> str:
    lines = ["        location / {"]
    if s.api_keys:
        lines += ["            if ($api_key_ok = 0) { return 401; }",
                  '            proxy_set_header Authorization "";  # the key stops here: engines never see it']
    if s.rate:
        lines.append(f"            limit_req zone=api burst={s.burst} nodelay;")
    lines.append("            proxy_pass http://engines;")
    if s.upstream_http == "1.1":
        lines += ["            proxy_http_version 1.1;              # chunked replies, keep-alive to the engines",
                  '            proxy_set_header Connection "";']
    lines += [
              "            proxy_set_header Host $host;",
              "            proxy_set_header X-Real-IP $remote_addr;",
              "            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
              "            proxy_set_header X-Forwarded-Proto $scheme;",
              f"            proxy_buffering {'on' if s.buffering else 'off'};"
              + ("" if s.buffering else "   # streamed tokens go out as they arrive"),
              *([] if s.honor_accel_buffering else
                ["            proxy_ignore_headers X-Accel-Buffering;  # the backend may not opt out of buffering"]),
              f"            proxy_read_timeout {s.read_timeout_s}s;  # a long generation may be silent a while",
              f"            proxy_send_timeout {s.read_timeout_s}s;",
              "        }"]
    return "\n".join(lines)


def _error_locations(s: ProxySettings) -> str:
    """OpenAI-style JSON bodies for the proxy's own refusals, so SDKs show a readable error."""
    retry_after = math.ceil(1 / s.rate_per_s) if s.rate_per_s else 1
    errors = {401: ("unauthorized", "invalid_api_key", "missing or wrong API key", ""),
              413: ("too_large", "request_too_large", f"request body larger than {s.max_body}", ""),
              429: ("rate_limited", "rate_limit_exceeded", "rate limit exceeded, retry later",
                    f"            add_header Retry-After {retry_after} always;\n")}
    blocks = []
    for status, (name, code, message, extra) in errors.items():
        body = json.dumps({"error": {"message": message, "type": code, "code": code}})
        blocks.append(f"        error_page {status} = @{name};\n"
                      f"        location @{name} {{\n            default_type application/json;\n{extra}"
                      f"            return {status} '{body}';\n        }}")
    return "\n".join(blocks)


def _user_directive() -> str:
    """Under root, the ``user`` line: a root master hands requests to unprivileged workers (the prefix
    folder is made traversable for them). Without root nginx ignores ``user``, so none is written."""
    if os.geteuid() != 0:
        return ""
    import grp
    import pwd
    try:
        nobody = pwd.getpwnam("nobody")
        return f"user {nobody.pw_name} {grp.getgrgid(nobody.pw_gid).gr_name};\n"
    except KeyError:
        return ""


def render_config(settings: ProxySettings, port: int, https_port: int | None = None) -> str:
    """The complete nginx.conf for ``settings``, listening on 127.0.0.1 only.

    Relative paths are relative to nginx's ``-p`` prefix (the proxy's temporary folder).
    """
    user = _user_directive()
    tls = ""
    if settings.tls and https_port:
        tls = (f"        listen 127.0.0.1:{https_port} ssl;\n"
               "        ssl_certificate cert.pem;\n        ssl_certificate_key key.pem;\n")
    return f"""# nginx.conf generated by labkit.proxy
{user}worker_processes 1;
pid nginx.pid;
error_log stderr warn;
events {{ worker_connections 512; }}

http {{
{_http_preamble(settings)}

{_upstream_block(settings)}

    server {{
        listen 127.0.0.1:{port};
{tls}        client_max_body_size {settings.max_body};   # 413 above it

        location = {READY_PATH} {{ access_log off; return 200 "ready\\n"; }}
        location = /health {{ proxy_pass http://engines/health; }}   # no key, no limit: for load balancers

{_api_location(settings)}

{_error_locations(settings)}
    }}
}}
"""


def site_config(site: str) -> str:
    """A site file (``upstream``/``server`` blocks, as in ``/etc/nginx/sites-enabled/``) inside the
    ``events``/``http`` context that Debian's ``/etc/nginx/nginx.conf`` wraps around it."""
    temp = "\n".join(f"    {kind}_temp_path tmp/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    body = "\n".join("    " + line if line.strip() else "" for line in site.strip("\n").splitlines())
    return f"pid nginx.pid;\nevents {{ worker_connections 64; }}\nhttp {{\n{temp}\n    access_log off;\n\n{body}\n}}\n"


def nginx_test(config_text: str) -> tuple[bool, str]:
    """Run ``nginx -t`` on a complete configuration; return (passed, nginx's message).

    Relative paths in the text resolve inside a scratch folder; the message names the file
    ``nginx.conf`` (line numbers are the text's own).
    """
    with tempfile.TemporaryDirectory(prefix="labkit-nginx-test-") as tmp:
        prefix = Path(tmp)
        (prefix / "nginx.conf").write_text(config_text)
        (prefix / "tmp").mkdir()
        out = subprocess.run(_nginx_argv(prefix, "-t"), capture_output=True, text=True, timeout=30)
        message = (out.stderr + out.stdout).replace(f"{prefix}/", "").strip()
    return out.returncode == 0, message


# --------------------------------------------------------------------------- the running proxy
@dataclass(eq=False)
class Proxy(FolderServer):
    """A running nginx. ``base_url`` is plain HTTP on 127.0.0.1; ``https_url`` the TLS listener.
    ``prefix`` is nginx's ``-p`` folder: config, pid, logs, temp files, certificate."""

    settings: ProxySettings
    https_port: int | None = None

    @property
    def https_url(self) -> str | None:
        return f"https://127.0.0.1:{self.https_port}" if self.https_port else None

    @property
    def cert_path(self) -> Path | None:
        return self.prefix / "cert.pem" if self.https_port else None

    @property
    def config_text(self) -> str:
        return (self.prefix / "nginx.conf").read_text()

    def requests(self, at_least: int = 0, timeout: float = 5.0) -> list[dict]:
        """Every request nginx has finished, oldest first: status, uri, upstream (host:port of the
        engine that answered, several when it retried), request_time in seconds.

        nginx writes a request's line just *after* sending its reply, so a client that has its
        answer may read the log a moment too early: ``at_least`` waits (up to ``timeout`` s) for
        that many lines.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                lines = (self.prefix / "access.log").read_text().splitlines()
            except OSError:
                lines = []
            rows = [json.loads(line) for line in lines if line.strip()]
            if len(rows) >= at_least or time.monotonic() > deadline:
                return rows
            time.sleep(0.01)

    def openai(self, api_key: str | None = None, **kwargs):
        """An ``openai.OpenAI`` client pointed at the proxy's ``/v1`` (the first API key by default)."""
        from openai import OpenAI
        kwargs.setdefault("base_url", self.base_url + "/v1")
        keys = self.settings.api_keys
        return OpenAI(api_key=api_key or (keys[0] if keys else "no-key-needed"), **kwargs)

    def __repr__(self) -> str:
        state = "running" if self.alive() else "stopped"
        return (f"<Proxy nginx {self.base_url} -> {', '.join(self.settings.backends)} "
                f"{self.settings.balance} pid={self.pid} {state}>")


def stop_all() -> None:
    """Stop every proxy this process started (labkit.servers.stop_all also does, at exit)."""
    from .servers import _live_folders, _live_lock
    with _live_lock:
        proxies = [fs for fs in _live_folders if isinstance(fs, Proxy)]
    for px in proxies:
        px.stop()


def _backend_address(backend) -> str:
    if isinstance(backend, Server):
        return f"{backend.base_url.split('://', 1)[1]}"
    text = str(backend).split("://", 1)[-1].rstrip("/")
    if not re.fullmatch(r"[A-Za-z0-9.\-\[\]:]+:\d+", text):
        raise ValueError(f"a backend is a labkit Server, 'host:port' or 'http://host:port'; got {backend!r}")
    return text


def start_nginx(backends, *, api_key: str | list[str] | None = None, ready_timeout: float = 30,
                **settings) -> Proxy:
    """Start nginx in front of ``backends`` (labkit Servers or ``host:port``) and return a :class:`Proxy`.

    ``settings`` are :class:`ProxySettings` fields: ``balance`` (``"least_conn"`` or
    ``"round_robin"``), ``rate``/``burst`` (``limit_req`` per client address, e.g. ``"10r/s"``: 429
    beyond rate + burst), ``buffering`` (``proxy_buffering``; a backend can still turn it off for its
    own reply with an ``X-Accel-Buffering: no`` header, as llama-server does, unless
    ``honor_accel_buffering=False``), ``upstream_http``, ``max_body`` (``client_max_body_size``),
    ``read_timeout_s``, ``tls`` (a second, TLS listener; certificate at ``Proxy.cert_path``).
    ``api_key``: one key or a list, checked by nginx.
    """
    keys = [api_key] if isinstance(api_key, str) else list(api_key or [])
    config = ProxySettings([_backend_address(b) for b in backends], api_keys=keys, **settings)
    last_error: Exception | None = None
    for _ in range(3):          # a free port can be taken by someone else before nginx binds it
        try:
            return _start_once(config, ready_timeout)
        except ServerStartError as exc:
            last_error = exc
            if "address already in use" not in str(exc).lower():
                raise
    raise last_error


def _start_once(settings: ProxySettings, ready_timeout: float) -> Proxy:
    nginx_binary()                                   # the install hint before anything is written
    prefix = Path(tempfile.mkdtemp(prefix="labkit-nginx-"))
    try:
        prefix.chmod(0o711)                          # workers (user nobody under root) reach tmp/
        (prefix / "tmp").mkdir()
        if settings.tls:
            self_signed_cert(prefix)
        port, https_port = free_port(), (free_port() if settings.tls else None)
        (prefix / "nginx.conf").write_text(render_config(settings, port, https_port))
        argv = _nginx_argv(prefix, "-g", "daemon off;")
        server = _start("nginx", "nginx", "127.0.0.1", port, None, argv, {}, READY_PATH, ready_timeout)
    except BaseException:
        shutil.rmtree(prefix, ignore_errors=True)
        raise
    return Proxy(server, prefix, settings, https_port)


def check_loopback(proxy: Proxy) -> bool:
    """True when every listener in the proxy's configuration is on a loopback address."""
    hosts = re.findall(r"listen\s+([^\s;:]+):\d+", proxy.config_text)
    return bool(hosts) and all(is_loopback(h) for h in hosts)


__all__ = ["start_nginx", "Proxy", "ProxySettings", "render_config", "site_config", "nginx_test",
           "nginx_binary", "nginx_version", "self_signed_cert", "check_loopback"]
