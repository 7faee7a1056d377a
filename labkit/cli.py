"""The ``labkit`` command (introduced in chapter 00).

    labkit doctor [--require-gpu] [--min-free-vram GB]   environment report; exit 1 on a failed check
    labkit serve ENGINE [--model M] [--port P]           a managed server in the foreground (Ctrl-C stops it)
    labkit run [NOTEBOOK ...] [--tier ci|full]           execute notebooks into build/, print a time table
    labkit bench --engine E [--model M]                  TTFT / ITL / tokens/s, saved as JSON + CSV
    labkit hardware                                      the hardware probe as a table (--json for JSON)
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import __version__

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCK_FILE = REPO_ROOT / "requirements" / "lock.txt"


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True   # a failed optional check is a warning, not an exit code


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_drift(lock: Path = LOCK_FILE) -> list[tuple[str, str, str | None]]:
    """(package, locked version, installed version or None) for every mismatch with the lock."""
    if not lock.exists():
        return []
    installed = {_normalise(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()
                 if d.metadata["Name"]}
    drift = []
    for line in lock.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^\s;#]+)", line.strip())
        if not m:
            continue
        name, version = _normalise(m.group(1)), m.group(3)
        have = installed.get(name)
        # local build tags like +cpu are the same release
        if have is None or have.split("+")[0] != version.split("+")[0]:
            drift.append((name, version, have))
    return drift


def doctor_checks(require_gpu: bool = False, min_free_vram_gb: float | None = None) -> list[Check]:
    from . import hardware, models
    from .errors import LabkitError
    checks = [Check("python", sys.version_info >= (3, 10), sys.version.split()[0], "Use Python 3.10 or newer.")]
    in_venv = sys.prefix != getattr(sys, "base_prefix", sys.prefix)
    checks.append(Check("virtual environment", in_venv, sys.prefix,
                        "Run labkit from the lab's environment: `make lab`, or `.venv/bin/labkit ...`.", required=False))
    for name in models.BUNDLED:
        try:
            path = models.get(name)
            checks.append(Check(f"bundled model {name}", True, f"{path} (checksum verified)"))
        except LabkitError as exc:
            checks.append(Check(f"bundled model {name}", False, str(exc), "make setup"))
    hw = hardware.probe()
    llama = hw.engines.get("llama.cpp")
    checks.append(Check("llama-cpp-python", bool(llama), llama or "not installed", "make setup"))
    try:
        import importlib.util
        server_ok = all(importlib.util.find_spec(m) for m in ("uvicorn", "fastapi", "sse_starlette", "starlette_context"))
    except Exception:
        server_ok = False
    checks.append(Check("llama-cpp-python [server] extra", server_ok, "present" if server_ok else "missing", "make setup"))
    checks.append(Check("vLLM environment (.venv-vllm)", bool(hw.engines.get("vllm")), hw.engines.get("vllm") or "missing",
                        "make setup (it builds .venv-vllm)", required=False))
    checks.append(Check("RAM available", hw.ram_available_gib >= 1.0, f"{hw.ram_available_gib:.1f} GiB of {hw.ram_total_gib:.1f} GiB",
                        "Close other programs; the CPU tier needs ~1 GiB free (vLLM chapter ~4 GiB)."))
    free_disk = shutil.disk_usage(REPO_ROOT).free / 2**30
    checks.append(Check("disk free", free_disk >= 2, f"{free_disk:.1f} GiB", "Free at least 2 GiB for caches and build/."))
    drift = lock_drift()
    checks.append(Check("versions match requirements/lock.txt", not drift,
                        "all match" if not drift else "; ".join(f"{n} {have or 'missing'} (lock {want})" for n, want, have in drift[:8])
                        + (f" … and {len(drift) - 8} more" if len(drift) > 8 else ""),
                        "make setup (reinstalls from the lock)", required=False))
    if require_gpu or min_free_vram_gb:
        gpus = hw.gpus
        if not gpus:
            checks.append(Check("GPU", False, "no usable NVIDIA GPU (nvidia-smi lists none)",
                                "Run on a GPU machine, or drop --require-gpu to allow CPU."))
        else:
            best = max(gpus, key=lambda g: g.memory_free_mib or 0)
            checks.append(Check("GPU", True, f"{best.name}, {(best.memory_free_mib or 0) / 1024:.1f} GiB free"))
            if min_free_vram_gb:
                free = (best.memory_free_mib or 0) / 1024
                checks.append(Check("free VRAM", free >= min_free_vram_gb, f"{free:.1f} GiB (need {min_free_vram_gb} GiB)",
                                    "Stop other GPU processes (nvidia-smi shows them) or use a smaller model/quant."))
        if hw.llama_cpp_gpu_offload is False:
            checks.append(Check("llama.cpp GPU build", False, "this llama-cpp-python was built without GPU offload",
                                "make setup GPU=1 (rebuilds with -DGGML_CUDA=on)"))
    return checks


def cmd_doctor(args) -> int:
    checks = doctor_checks(args.require_gpu, args.min_free_vram)
    width = max(len(c.name) for c in checks)
    failed = 0
    for c in checks:
        mark = "ok  " if c.ok else ("FAIL" if c.required else "warn")
        print(f"[{mark}] {c.name.ljust(width)}  {c.detail}")
        if not c.ok:
            print(f"       {''.ljust(width)}  fix: {c.fix}")
            failed += c.required
    print(f"\nlabkit {__version__}: {len(checks) - failed} of {len(checks)} required checks passed" if failed
          else f"\nlabkit {__version__}: all required checks passed")
    return 1 if failed else 0


def cmd_serve(args) -> int:
    from .servers import serve
    options = {}
    for item in args.option or []:
        key, _, value = item.partition("=")
        options[key] = value
    with serve(args.engine, args.model, host=args.host, port=args.port, api_key=args.api_key, **options) as srv:
        print(f"{args.engine} serving {srv.model!r} at {srv.base_url} (pid {srv.pid}); Ctrl-C stops it.", flush=True)
        try:
            while srv.alive():
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        if not srv.alive():
            print(f"The server exited. Last log lines:\n{srv.logs()}", file=sys.stderr)
            return 1
    return 0


def cmd_run(args) -> int:
    from . import runner
    paths = runner.resolve(args.notebooks)
    params = dict(p.split("=", 1) for p in args.param or [])
    print(f"Executing {len(paths)} notebook(s), tier={args.tier}, into {args.out}/", flush=True)
    results = runner.run_all(paths, tier=args.tier, out_dir=Path(args.out), parameters=params, html=not args.no_html)
    runner.write_summary(results, Path(args.out) / "summary.json")
    print()
    print(runner.format_table(results))
    return 0 if all(r.ok for r in results) else 1


def cmd_bench(args) -> int:
    from . import bench
    from .servers import serve
    rows = []
    if args.engine == "in-process":
        from llama_cpp import Llama
        from . import hardware, models
        llm = Llama(model_path=str(models.get(args.model)), n_ctx=2048, n_threads=hardware.probe().usable_cores, verbose=False)
        rows.append({"engine": "llama.cpp in-process", "concurrency": 1,
                     **bench.table(bench.run_llama(llm, max_tokens=args.max_tokens, runs=args.runs))})
    else:
        extra = {"ignore_eos": True} if args.engine == "vllm" else None
        with serve(args.engine, args.model) as srv:
            for level in args.concurrency:
                timings, wall = bench.run_openai(srv, max_tokens=args.max_tokens, concurrency=level,
                                                 requests=max(level, args.runs), extra_body=extra)
                rows.append({"engine": args.engine, "concurrency": level,
                             "throughput_tps": sum(t.output_tokens for t in timings) / wall, **bench.table(timings)})
    import pandas as pd
    print(pd.DataFrame(rows).round(3).to_string(index=False))
    path = bench.save_results(rows, Path(args.out), meta={"model": args.model or "default", "max_tokens": args.max_tokens})
    print(f"\nsaved {path} (and .csv) with this machine's fingerprint")
    return 0


def cmd_hardware(args) -> int:
    from . import hardware
    hw = hardware.probe()
    if args.json:
        print(json.dumps(hw.as_dict(), indent=2))
    else:
        rows = hw.table()
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"{k.ljust(width)}  {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="labkit", description="Local LLM Lab helper commands.")
    parser.add_argument("--version", action="version", version=f"labkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("doctor", help="check this environment; exit 1 if a required check fails")
    p.add_argument("--require-gpu", action="store_true", help="fail unless a usable NVIDIA GPU exists (a launch guard)")
    p.add_argument("--min-free-vram", type=float, metavar="GB", help="fail unless a GPU has this much free memory")
    p.set_defaults(func=cmd_doctor)
    p = sub.add_parser("serve", help="run an engine's server in the foreground")
    p.add_argument("engine", choices=["llama.cpp", "vllm", "ollama"])
    p.add_argument("--model", default=None, help="bundled name, .gguf path or HF folder (default: $LABKIT_MODEL or smollm2)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback; use an --api-key if you widen it)")
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--api-key", default=None)
    p.add_argument("-o", "--option", action="append", metavar="KEY=VALUE", help="extra engine flag, e.g. -o n_ctx=4096")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("run", help="execute notebooks with papermill into build/")
    p.add_argument("notebooks", nargs="*", help="chapter names or numbers (default: all)")
    p.add_argument("--tier", default="ci", choices=["ci", "full"])
    p.add_argument("--out", default=str(REPO_ROOT / "build"))
    p.add_argument("-p", "--param", action="append", metavar="NAME=VALUE", help="extra notebook parameter")
    p.add_argument("--no-html", action="store_true")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("bench", help="benchmark an engine (TTFT, ITL, tokens/s) and save the results")
    p.add_argument("--engine", default="llama.cpp", choices=["in-process", "llama.cpp", "vllm", "ollama"])
    p.add_argument("--model", default=None)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1])
    p.add_argument("--out", default=str(REPO_ROOT / "build" / "bench" / "cli"))
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("hardware", help="print the hardware probe")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_hardware)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import LabkitError
    try:
        return args.func(args)
    except LabkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
