"""Serve a base model and every adapter under a folder through an OpenAI-compatible HTTP API.

Example: `lorakit serve --model smollm2-135m-instruct --adapters runs/adapters --port 8000`, then
ask for `"model": "<adapter folder name>"` (or the base model's name, or "base") in
/v1/completions or /v1/chat/completions. Adapters can be added and removed while it runs
(POST /v1/load_lora_adapter, /v1/unload_lora_adapter). With `--api-keys keys.json`
({"key": ["adapter-a", "base"], "admin-key": "*"}), each key may use only the models listed.
"""
from __future__ import annotations

from ..serve.server import ServeConfig
from .args import add_config_args, config_from_args


def register(p):
    add_config_args(p, ServeConfig, defaults={"dtype": "auto"})
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    p.add_argument("--api-keys", default=None, help="JSON file: API key -> models it may use, or \"*\"")


def run(args) -> int:
    import signal
    import sys
    import threading

    from ..serve.api import create_app, read_api_keys, serve_in_background
    from ..serve.server import build

    keys = read_api_keys(args.api_keys) if args.api_keys else None
    served = build(config_from_args(ServeConfig, args, **({} if args.dtype else {"dtype": "auto"})))
    print(f"lorakit serve: weights {served.precision}; {served.packing}", file=sys.stderr, flush=True)
    stopped = threading.Event()

    def stop(*_):
        stopped.set()
        served.engine.stop()
    signal.signal(signal.SIGTERM, stop)
    # the HTTP server on a background thread, the engine on this one (see Engine.run)
    with serve_in_background(create_app(served, keys, start_engine=False), args.host, args.port) as url:
        skipped = f", {len(served.skipped)} skipped (see the warnings above)" if served.skipped else ""
        print(f"lorakit serve: {served.name} with {len(served.adapters.names())} adapters{skipped} on {url}/v1 "
              "(Ctrl-C stops)", flush=True)
        try:
            served.engine.run()
            if served.engine.failure is not None:        # stay up to say so: /health answers 503, requests 503
                print(f"lorakit serve: the engine failed ({served.engine.failure!r}); /health reports it until "
                      "the server is stopped", file=sys.stderr, flush=True)
                while not stopped.wait(1):
                    pass
        except KeyboardInterrupt:
            pass
    served.close()
    return 1 if served.engine.failure is not None else 0
