"""The ``agentmem`` command line: run, chat, serve, bench, calibrate."""

from __future__ import annotations

import argparse
import os
import sys

from .models import DEFAULT_MODEL
from .units import MiB


def _add_session_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="smollm2-135m (default), gemma3-270m, a HF dir or a .gguf")
    p.add_argument("--max-kv-mb", type=float, default=64.0, help="KV budget in MiB (default 64)")
    p.add_argument(
        "--budget-covers",
        choices=["kv", "all"],
        default="kv",
        help="kv: --max-kv-mb bounds the cache; all: the cache, query buffer and compaction work together",
    )
    p.add_argument("--max-work-mb", type=float, default=None, help="bound on one compaction's working memory (MiB)")
    p.add_argument(
        "--policy",
        default=None,
        help="am-halve (default), streaming, truncate, h2o, snapkv, kvzip, a preset name or a .json/.toml file",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: fp32 on CPU)")
    p.add_argument("--seed", type=int, default=0)


def _session(args):
    from .agent import AgentSession

    return AgentSession(
        model=args.model,
        max_kv_mb=args.max_kv_mb,
        policy=args.policy,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        max_work_mb=args.max_work_mb,
        budget_covers=args.budget_covers,
    )


def _print_stats(session) -> None:
    st = session.stats
    print(
        f"[agentmem] kv {st.kv_bytes / MiB:.2f} MiB (peak {st.peak_kv_bytes / MiB:.2f}, max "
        f"{(st.max_kv_bytes or 0) / MiB:.2f}), payload {st.payload_bytes / MiB:.2f} MiB, "
        f"{st.logical_tokens} tokens read, {st.physical_tokens:.0f} stored, {len(st.compactions)} compactions",
        file=sys.stderr,
    )
    print(
        f"[agentmem] beside the cache: query buffer {st.query_buffer_bytes / MiB:.2f} MiB, compaction work peak "
        f"{st.peak_work_bytes / MiB:.2f} MiB, undo state peak {st.peak_undo_bytes / MiB:.2f} MiB ({st.undo_device})"
        + (f"; max_kv_mb covers all: {st.budget_bytes / MiB:.2f} MiB" if st.budget_covers == "all" else ""),
        file=sys.stderr,
    )


def _stream_to_terminal(events, summary: bool = True):
    """Text to stdout, compaction receipts to stderr; returns the result."""
    result = None
    for ev in events:
        if ev.kind == "token":
            sys.stdout.write(ev.text)
            sys.stdout.flush()
        elif ev.kind == "compaction":
            print(f"\n{ev.compaction.receipt()}", file=sys.stderr, flush=True)
        elif ev.kind == "done":
            result, s = ev.result, ev.result.stats
            if summary:
                print(
                    f"\n[agentmem] {s.generated_tokens} tokens, {s.decode_tps:.1f} tok/s, "
                    f"finish: {ev.result.finish_reason}",
                    file=sys.stderr,
                )
    return result


def cmd_run(args) -> int:
    session = _session(args)
    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    if args.raw or session.tokenizer.chat_template is None:
        events = session.stream(args.prompt, ignore_eos=args.ignore_eos, **kwargs)
    else:
        events = session.chat_stream([{"role": "user", "content": args.prompt}], **kwargs)
    _stream_to_terminal(events)
    _print_stats(session)
    return 0


DEMO_PROBLEM = (
    "Sara buys 4 notebooks at 3 dollars each and 2 pens at 5 dollars each. She pays with a 50 dollar bill. "
    "How much change does she get?"
)


def cmd_demo(args) -> int:
    """The main job on the capable model: a word problem reasoned out step by step under a budget the
    run outgrows several times, then the answer and memory used against an unbounded run."""
    from .agent import AgentSession
    from .bench.problems import INSTRUCTION, extract_answer

    session = AgentSession(model=args.model, max_kv_mb=args.max_kv_mb, policy=args.policy, device=args.device)
    holds = session.cache.max_tokens()
    print(
        f"[agentmem] {session.spec.name}, policy {session.policy.name}, max_kv_mb={args.max_kv_mb:g} "
        f"(holds {holds} tokens of KV); problem:\n{args.problem}\n",
        file=sys.stderr,
    )
    events = session.chat_stream(args.problem + INSTRUCTION, max_new_tokens=args.max_new_tokens)
    result = _stream_to_terminal(events, summary=False)
    st = session.stats
    full = st.logical_tokens * session.cache.bytes_per_token()
    print(
        f"\n\n[agentmem] answer: {extract_answer(result.text)}; {st.logical_tokens} tokens read and written, "
        f"{len(st.compactions)} compactions; KV memory peak {st.peak_kv_bytes / MiB:.2f} MiB within "
        f"{st.max_kv_bytes / MiB:.2f} MiB, where an unbounded cache would hold {full / MiB:.2f} MiB "
        f"({full / max(1, st.peak_kv_bytes):.1f}x); {result.stats.decode_tps:.1f} tok/s",
        file=sys.stderr,
    )
    return 0


def cmd_chat(args) -> int:
    session = _session(args)
    print("agentmem chat: one message per line, Ctrl-D to quit", file=sys.stderr)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        _stream_to_terminal(session.chat_stream(line, max_new_tokens=args.max_new_tokens, temperature=args.temperature))
        _print_stats(session)
    return 0


def cmd_bench(args) -> int:
    import importlib

    return importlib.import_module(f"agentmem.bench.{args.what}").main(args.rest)


def cmd_calibrate(args) -> int:
    from .calibrate import main as calibrate_main

    return calibrate_main(args.rest)


def cmd_serve(args) -> int:
    from .models import load_model
    from .serve import serve

    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    serve(
        loaded,
        host=args.host,
        port=args.port,
        max_kv_mb=args.max_kv_mb,
        max_kv_mb_limit=args.max_kv_mb_limit,
        budget_covers=args.budget_covers,
        max_work_mb=args.max_work_mb,
        policy=args.policy,
        max_body_bytes=int(args.max_body_mb * MiB),
        max_sessions=args.max_sessions,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        api_key=args.api_key or os.environ.get("AGENTMEM_API_KEY") or None,
        cors_origins=args.cors_origin or [],
        auto_recall=args.auto_recall,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agentmem", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="generate from a prompt under a KV budget; text to stdout, receipts to stderr")
    run.add_argument("prompt")
    _add_session_args(run)
    run.add_argument("--max-new-tokens", type=int, default=256)
    run.add_argument("--temperature", type=float, default=0.0)
    run.add_argument("--top-p", type=float, default=1.0)
    run.add_argument("--raw", action="store_true", help="continue the prompt as raw text (no chat template)")
    run.add_argument("--ignore-eos", action="store_true", help="with --raw: keep going past end-of-sequence")
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo", help="the main job: a problem reasoned out under a budget it outgrows (make run)")
    demo.add_argument("--model", default="qwen2.5-coder-0.5b")
    demo.add_argument("--max-kv-mb", type=float, default=4.0)
    demo.add_argument("--policy", default=None)
    demo.add_argument("--device", default=None)
    demo.add_argument("--max-new-tokens", type=int, default=500)
    demo.add_argument("--problem", default=DEMO_PROBLEM)
    demo.set_defaults(func=cmd_demo)

    chat = sub.add_parser("chat", help="interactive chat on stdin under a KV budget")
    _add_session_args(chat)
    chat.add_argument("--max-new-tokens", type=int, default=512)
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.set_defaults(func=cmd_chat)

    bench = sub.add_parser("bench", help="benchmarks; their own options follow the name (see --help of each)")
    bench.add_argument("what", choices=["quality", "reasoning", "agent", "speed", "online", "positions", "memory"])
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)

    serve = sub.add_parser("serve", help="OpenAI-compatible server (FastAPI + uvicorn), a session per conversation")
    _add_session_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-kv-mb-limit", type=float, default=1024.0, help="largest max_kv_mb a request may ask")
    serve.add_argument("--max-body-mb", type=float, default=8.0, help="largest request body (MiB); larger: 413")
    serve.add_argument("--max-sessions", type=int, default=32, help="conversations kept (least recently used out)")
    serve.add_argument("--max-new-tokens", type=int, default=512, help="when a request gives no max_tokens")
    serve.add_argument("--api-key", default=None, help="clients must send it as a bearer token (or AGENTMEM_API_KEY)")
    serve.add_argument("--cors-origin", action="append", help="allow browser requests from this origin ('*': any)")
    serve.add_argument(
        "--auto-recall", action="store_true", help="read back compacted tool-output lines matching each user turn"
    )
    serve.set_defaults(func=cmd_serve)

    calibrate = sub.add_parser("calibrate", help="measure per-head sensitivity curves and write a head profile")
    calibrate.add_argument("rest", nargs=argparse.REMAINDER)
    calibrate.set_defaults(func=cmd_calibrate)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["calibrate"]:  # its options go to calibrate's own parser (REMAINDER drops a leading option)
        from .calibrate import main as calibrate_main

        return calibrate_main(argv[1:])
    args = build_parser().parse_args(argv)
    from .errors import AgentMemError

    try:
        return args.func(args)
    except (AgentMemError, ValueError) as exc:
        print(f"agentmem: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
