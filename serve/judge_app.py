"""The judge server TAR queries: an OpenAI-compatible chat API on LitServe.

    python serve/judge_app.py                                   # rules backend, http://127.0.0.1:8011/v1
    python serve/judge_app.py --backend hf --model Qwen/Qwen3-4B-Instruct-2507 --max-batch-size 8
    python serve/judge_app.py --backend hf --model demo/model --served-model-name tiny-judge --api-key KEY

Routes: POST /v1/chat/completions (streaming or not), GET /v1/models, GET /health. Training reaches it
through `video_r2.judge.JudgeClient` (`model.init_args.judge.init_args.base_url: http://127.0.0.1:8011/v1`
and `.model: <served name>`), or with `judge: null` through the original recipe's OPENAI_API_BASE /
SERVED_MODEL / OPENAI_API_KEY. A `vllm serve MODEL --port 8011` can take its place; see docs/judge.md.
The pieces live in `video_r2/judge/` (server.py, backends.py, rules.py); this file parses flags, logs and runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import signal
import sys
import threading
import time
import urllib.request
from pathlib import Path

if importlib.util.find_spec("video_r2") is None:  # a checkout that was not pip-installed: it is beside us
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from video_r2.judge import DEFAULT_MODEL  # noqa: E402
from video_r2.judge.backends import make_backend  # noqa: E402
from video_r2.judge.server import Limits, build_server  # noqa: E402

logger = logging.getLogger("video_r2.judge_app")

DEFAULT_PORT = 8011  # the port of video_r2.judge.DEFAULT_BASE_URL
# LitServe binds only these (it checks before starting); anything else would be refused later, less clearly.
BINDABLE_HOSTS = ("127.0.0.1", "0.0.0.0", "::")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=("rules", "hf"), default="rules",
                   help="rules: deterministic, no model (default); hf: a transformers causal LM")
    p.add_argument("--model", help="hf backend: local checkpoint directory or hub id")
    p.add_argument("--served-model-name", default=DEFAULT_MODEL,
                   help="name clients send as `model` and /v1/models lists (default: %(default)s, which is also "
                        "the training side's default judge_model, whichever backend serves it)")
    p.add_argument("--host", default="127.0.0.1", choices=BINDABLE_HOSTS,
                   help="interface to bind; 0.0.0.0 exposes the judge to the network (use --api-key then)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--max-batch-size", type=int, default=1, help="requests generated together (hf: left-padded)")
    p.add_argument("--batch-timeout", type=float, default=0.02, help="seconds to wait for a batch to fill")
    p.add_argument("--workers", type=int, default=1, help="inference worker processes (each loads the model)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds from a request's arrival to its reply, queue included; then 504 and the worker "
                        "drops it (0: no limit)")
    p.add_argument("--api-key", default=os.environ.get("VIDEO_R2_JUDGE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $VIDEO_R2_JUDGE_API_KEY; none: open)")
    p.add_argument("--max-request-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    p.add_argument("--max-reasoning-chars", type=int, default=Limits.max_reasoning_chars,
                   help="longest text a judge prompt may ask about (the reasoning; for consistency also question "
                        "and answer), checked before it is parsed; longer gets 413 (default: %(default)s)")
    p.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask for")
    p.add_argument("--default-max-tokens", type=int, default=1024, help="max_tokens when a request gives none")
    p.add_argument("--accelerator", choices=("auto", "cpu", "cuda", "mps"), default="auto",
                   help="hf backend device (the rules backend always runs on the CPU)")
    p.add_argument("--dtype", default="auto", help="hf backend weights dtype: auto, bfloat16, float16, float32")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    args = p.parse_args(argv)
    if args.backend == "hf" and not args.model:
        p.error("--backend hf needs --model PATH_OR_HUB_ID")
    if args.max_batch_size < 1 or args.workers < 1:
        p.error("--max-batch-size and --workers must be at least 1")
    if args.default_max_tokens > args.max_tokens_limit:
        p.error("--default-max-tokens cannot exceed --max-tokens-limit")
    return args


def _url_host(host: str) -> str:
    # A wildcard bind is reached locally through the loopback address.
    return "127.0.0.1" if host in ("0.0.0.0", "::") else host


def announce_when_ready(args: argparse.Namespace, started: float) -> None:
    """Poll /health in the background and, once it answers, log the URL and the config that points at it."""
    base = f"http://{_url_host(args.host)}:{args.port}"
    while True:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=1) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        time.sleep(0.1)
    url, name = f"{base}/v1", args.served_model_name
    key = "  OPENAI_API_KEY=<the --api-key>" if args.api_key else ""
    logger.info(
        "judge ready in %.1f s: %s serving '%s' (%s backend). Point training at it with\n"
        "  the config:       model.init_args.judge: {class_path: video_r2.judge.JudgeClient, "
        "init_args: {base_url: %s, model: %s%s}}\n"
        "  or the flags:     --model.init_args.judge.init_args.base_url %s --model.init_args.judge.init_args.model %s\n"
        "  or (judge: null)  OPENAI_API_BASE=%s SERVED_MODEL=%s%s",
        time.monotonic() - started, url, name, args.backend,
        url, name, ", api_key: <the --api-key>" if args.api_key else "", url, name, url, name, key,
    )


def _shut_down_on_signals() -> None:
    """SIGTERM (docker stop, kill, a test fixture) and SIGINT take LitServe's graceful Ctrl+C path.

    LitServer.run shuts its workers down on KeyboardInterrupt but has no SIGTERM handler, so without this the
    main process would die at once and leave its worker processes behind. SIGINT gets the handler too because
    a shell script's `python serve/judge_app.py &` starts with SIGINT ignored. Processes forked later inherit
    the handler; they fall back to the default action so that LitServe can still stop them.
    """
    main_pid = os.getpid()

    def handler(signum, frame):
        if os.getpid() != main_pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.monotonic()
    if args.host != "127.0.0.1" and not args.api_key:
        logger.warning("binding %s without --api-key: anyone who can reach this port can use the judge", args.host)
    backend = make_backend(args.backend, args.model, dtype=args.dtype)
    server = build_server(
        backend,
        served_model_name=args.served_model_name,
        limits=Limits(max_tokens=args.max_tokens_limit, default_max_tokens=args.default_max_tokens,
                      max_reasoning_chars=args.max_reasoning_chars),
        api_key=args.api_key,
        max_batch_size=args.max_batch_size,
        batch_timeout=args.batch_timeout,
        workers=args.workers,
        timeout=args.timeout,
        max_request_bytes=args.max_request_bytes,
        accelerator="cpu" if args.backend == "rules" else args.accelerator,
    )
    logger.info("starting the %s judge on %s:%d ...", args.backend, args.host, args.port)
    threading.Thread(target=announce_when_ready, args=(args, started), daemon=True).start()
    _shut_down_on_signals()
    try:
        # generate_client_file=False: LitServe would otherwise drop a client.py into the working directory.
        server.run(host=args.host, port=args.port, generate_client_file=False, log_level=args.log_level)
    except KeyboardInterrupt:  # a signal before LitServe's own handling was in place
        logger.info("interrupted during start-up")
    logger.info("judge stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
