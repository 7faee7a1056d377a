"""The ``labkit`` command (introduced in chapter 00).

    labkit doctor [--require-gpu] [--min-free-vram GB]   environment report; exit 1 on a failed check
    labkit serve ENGINE [--model M] [--port P]           a managed server in the foreground (Ctrl-C stops it);
                                                         ENGINE: llama.cpp, llama-server, vllm or ollama
    labkit run [NOTEBOOK ...] [--tier ci|full] [--model M]   execute notebooks into build/, print a time table
                                  [--update-references]  (rewrite the nbval-check-output cells from this run)
    labkit bench --engine E [--model M]                  TTFT / ITL / tokens/s, saved as JSON + CSV
    labkit hardware                                      the hardware probe as a table (--json for JSON)
    labkit syllabus [--summary build/summary.json]       each chapter's teaching time: reading, code, exercises, run
    labkit mcp [--transport stdio|http] [--port P] [--token T] [--backend NAME=URL[,MODEL]]...
                                                         the MCP server in front of the engines (chapter 09);
                                                         no --backend: it starts the bundled model on llama.cpp
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import __version__, engines
from .env import REPO_ROOT


def cmd_doctor(args) -> int:
    from . import doctor
    checks = doctor.run_checks(model=args.model, n_ctx=args.n_ctx, require_gpu=args.require_gpu,
                               min_free_vram_gb=args.min_free_vram, ports=args.port or [], start_engine=args.start)
    print(doctor.to_json(checks) if args.json else doctor.format_checks(checks))
    return 0 if doctor.passed(checks) else 1


def cmd_serve(args) -> int:
    import signal

    from .servers import serve
    # "Ctrl-C stops it" must hold even when this process inherited SIGINT as ignored (anything started in the
    # background by a non-interactive shell, `cmd &` in a script or CI, does): Python then installs no handler.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    options = {}
    for item in args.option or []:
        key, _, value = item.partition("=")
        # "-o jinja" or "-o jinja=true" is a bare flag for llama-server and vLLM
        options[key] = {"": True, "true": True, "false": False}.get(value.lower(), value)
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
    if args.model:
        from . import models
        models.get(args.model)          # fail now, with the fix, rather than in every chapter
        params["model"] = args.model
    print(f"Executing {len(paths)} notebook(s), tier={args.tier}, model={params.get('model', 'default')}, into {args.out}/",
          flush=True)
    refresh = args.update_references
    if refresh and (params or args.tier != "ci"):
        print("--update-references needs the chapters' own parameters (tier ci, the bundled model)", file=sys.stderr)
        return 2
    results = runner.run_all(paths, tier=args.tier, out_dir=Path(args.out), parameters=params, html=not args.no_html,
                             references=False if refresh else None)
    runner.write_summary(results, Path(args.out) / "summary.json")
    for path, result in zip(paths, results):
        if refresh and result.ok:
            print(f"  {path.name}: {runner.update_references(path, result.output)} reference cell(s) rewritten")
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


def runner_path(stem: str) -> Path:
    from . import runner
    return next(p for p in runner.discover() if p.stem == stem)


def _if_exists(path: Path) -> Path | None:
    return path if path.exists() else None


def cmd_syllabus(args) -> int:
    from . import syllabus
    rows = syllabus.table(summary=Path(args.summary))
    if args.parts:
        executed = Path(args.summary).parent
        rows = [part for r in rows for part in (
            syllabus.parts(runner_path(r.chapter), syllabus.SEAMS[r.chapter[:2]], _if_exists(executed / f"{r.chapter}.ipynb"))
            if r.chapter[:2] in syllabus.SEAMS else [r])]
    print(f"{'chapter':26} {'words':>6} {'code':>5} {'exer.':>5} {'run s':>6} {'minutes':>7}")
    for r in rows:
        flag = "  over a 90-minute slot" if r.minutes > syllabus.WORKSHOP_SLOT_MIN[1] else ""
        print(f"{r.chapter:26} {r.words:6d} {r.code_lines:5d} {r.exercises:5d} {r.run_s:6.0f}{'' if r.run_source == 'measured' else '*'}"
              f" {r.minutes:7.0f}{flag}")
    print(f"rates: {syllabus.RATES}; * = budget or no executed copy, no measured run in {args.summary}")
    return 0


def cmd_mcp(args) -> int:
    from . import mcp_server
    try:
        return mcp_server.run_from_args(args)
    except ValueError as exc:          # a malformed --backend or --default: say which, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="labkit", description="Local LLM Lab helper commands.")
    parser.add_argument("--version", action="version", version=f"labkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("doctor", help="check this environment; exit 1 if a required check fails")
    p.add_argument("--require-gpu", action="store_true", help="fail unless a usable NVIDIA GPU exists (a launch guard)")
    p.add_argument("--min-free-vram", type=float, metavar="GB", help="fail unless a GPU has this much free memory")
    p.add_argument("--model", default=None, help="check memory headroom for this model (default: $LABKIT_MODEL or smollm2)")
    p.add_argument("--n-ctx", type=int, default=2048, help="context length for the memory headroom check")
    p.add_argument("--port", type=int, action="append", help="fail if this port is already taken (repeatable)")
    p.add_argument("--start", action="store_true", help="also start and stop a llama.cpp server (slower, thorough)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_doctor)
    p = sub.add_parser("serve", help="run an engine's server in the foreground")
    p.add_argument("engine", choices=list(engines.names()))
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
    p.add_argument("--model", default=None, help="run every chapter with this model: a bundled name (gemma3 ...) or a .gguf path")
    p.add_argument("-p", "--param", action="append", metavar="NAME=VALUE", help="extra notebook parameter")
    p.add_argument("--no-html", action="store_true")
    p.add_argument("--update-references", action="store_true",
                   help="rewrite the committed outputs of the nbval-check-output cells from this run")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("bench", help="benchmark an engine (TTFT, ITL, tokens/s) and save the results")
    p.add_argument("--engine", default="llama.cpp",
                   choices=["in-process", *(e.name for e in engines.all_engines() if e.serves_model)])
    p.add_argument("--model", default=None)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1])
    p.add_argument("--out", default=str(REPO_ROOT / "build" / "bench" / "cli"))
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("hardware", help="print the hardware probe")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_hardware)
    p = sub.add_parser("syllabus", help="each chapter's teaching time (reading, code, exercises, measured run)")
    p.add_argument("--summary", default=str(REPO_ROOT / "build" / "summary.json"), help="a labkit run's summary.json")
    p.add_argument("--parts", action="store_true", help="split the long chapters at labkit.syllabus.SEAMS")
    p.set_defaults(func=cmd_syllabus)
    from .mcp_server import add_arguments as mcp_arguments  # argparse only: the MCP SDK loads when the command runs
    p = sub.add_parser("mcp", help="run the MCP server (stdio or Streamable HTTP) in front of the engines")
    mcp_arguments(p)
    p.set_defaults(func=cmd_mcp)
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
