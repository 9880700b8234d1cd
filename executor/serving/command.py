"""`pensieve serve`: load the model, build the engine from the options (or a scenario), serve HTTP until
SIGTERM or Ctrl-C, then let in-flight requests finish (up to --shutdown-timeout) and cancel the rest."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys
import threading

from executor.engine import Engine, EngineConfig
from executor.models import LoadedModel, default_device, load_model
from executor.serving.app import ServeState, build_app
from executor.serving.loop import EngineLoop
from executor.serving.metrics import ServingMetrics
from executor.serving.routing import ConversationRouter
from executor.tokenizer import text_tokenizer
from pensieve.cost import CostModel
from pensieve.policies import policy_class
from pensieve.signals import received


def build_state(loaded: LoadedModel, config: EngineConfig, *, cost_model: CostModel | None = None,
                model_name: str | None = None, max_tokens: int = 256, min_share: float = 0.5,
                max_conversations: int = 10_000, threads: int | None = None,
                batch_window_s: float = 0.02) -> ServeState:
    """An engine, its loop (not started: `loop.run()` or `loop.start()`) and what the endpoints need."""
    engine = Engine(loaded, config, cost_model=cost_model)
    router = ConversationRouter(config.chunk_tokens, min_share, max_conversations)
    model_name = model_name or loaded.name
    metrics = ServingMetrics(engine, model_name)
    loop = EngineLoop(engine, router, metrics, threads, batch_window_s)
    return ServeState(loop, metrics, text_tokenizer(loaded), model_name, engine.max_context,
                      loaded.dims["vocab_size"], max_tokens, config.temperature, config.top_p)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free one), bound before the server starts so its address is known."""
    try:
        return socket.create_server((host, port), reuse_port=False)
    except OSError as exc:
        raise ValueError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})") from None


SHUTDOWN_BACKSTOP_S = 10.0  # after the drain time: cancelled requests end at their next token well within it


def make_server(state: ServeState, shutdown_timeout: float = 30.0, log_level: str = "warning"):
    """The uvicorn server of `state`'s app; `server.run(sockets=[sock])` serves until SIGTERM or Ctrl-C.

    On shutdown, requests in flight have `shutdown_timeout` seconds to finish; then the engine
    cancels them, so that each ends at its next token with finish_reason "abort" and a whole
    response, rather than a connection cut by uvicorn's own timeout (kept as a backstop).
    """
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            asyncio.get_running_loop().call_later(shutdown_timeout, state.loop.cancel_all)
            await super().shutdown(sockets)

    config = uvicorn.Config(build_app(state), log_level=log_level, lifespan="on", access_log=False,
                            timeout_graceful_shutdown=shutdown_timeout + SHUTDOWN_BACKSTOP_S)
    return Server(config)


def _engine_config(args: argparse.Namespace, loaded: LoadedModel) -> tuple[EngineConfig, CostModel | None]:
    """From a scenario (its cache, scheduler and policy) when given, else from the prototype's options;
    options given explicitly win over the scenario's."""
    from executor.server import default_cache_gb

    if args.scenario:
        from executor.realtime import engine_config
        from pensieve.cli import scenario_overrides
        from pensieve.config import load_scenario
        from pensieve.core import build_cost_model

        scenario = load_scenario(args.scenario, scenario_overrides(args))
        config = engine_config(scenario, args.policy)
        cost = build_cost_model(scenario, args.scenario)
    else:
        device_gb, host_gb = default_cache_gb(loaded.device)
        config = EngineConfig(policy=args.policy or "pensieve", device_cache_gb=device_gb, host_cache_gb=host_gb,
                              chunk_tokens=args.chunk_tokens)
        cost = None
    changes = {"temperature": args.temperature, "top_p": args.top_p}
    if args.gpu_cache is not None:
        changes["device_cache_gb"] = args.gpu_cache
    if args.cpu_cache is not None:
        changes["host_cache_gb"] = args.cpu_cache
    from dataclasses import replace

    return replace(config, **changes), cost


def _load(args: argparse.Namespace) -> LoadedModel:
    if args.scenario and args.model is None:
        from executor.realtime import load_scenario_model
        from pensieve.cli import scenario_overrides
        from pensieve.config import load_scenario

        return load_scenario_model(load_scenario(args.scenario, scenario_overrides(args)), args.scenario, args.device)
    return load_model(args.model, args.device or default_device(), args.dtype)


def serve_command(args: argparse.Namespace) -> int:
    if args.policy is not None:
        policy_class(args.policy)  # an unknown policy fails before the model loads
    if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ValueError(f"need --max-new-tokens >= 1, --temperature >= 0 and 0 < --top-p <= 1, got "
                         f"{args.max_new_tokens}, {args.temperature} and {args.top_p}")
    sock = bind(args.host, args.port)  # a taken port fails before the model loads
    loaded = _load(args)
    config, cost = _engine_config(args, loaded)
    state = build_state(loaded, config, cost_model=cost, model_name=args.served_model_name,
                        max_tokens=args.max_new_tokens, min_share=args.min_prefix_share,
                        max_conversations=args.max_conversations, batch_window_s=args.batch_window_ms / 1e3)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(name)s: %(message)s")
    engine = state.loop.engine
    gb = engine.bytes_per_chunk / 1e9
    host, port = sock.getsockname()[:2]
    print(f"pensieve serve: {state.model_name} on {loaded.device}, policy {engine.cache.policy.name}, "
          f"device cache {engine.cache.device.capacity * gb:.3g} GB, host cache {engine.cache.host.capacity * gb:.3g} "
          f"GB\nlistening on http://{host}:{port} (OpenAI API under /v1, Prometheus metrics at /metrics)",
          flush=True)
    server = make_server(state, args.shutdown_timeout, args.log_level)
    caught = serve_in_main_thread(state, server, sock)
    stats = engine.cache.stats
    print(f"pensieve serve: stopped; {state.loop.served} requests served, chunks swapped in {stats.swap_in_chunks} / "
          f"out {stats.swap_out_chunks}, dropped {stats.dropped_chunks}", file=sys.stderr, flush=True)
    return 130 if caught else 0  # the command line exits 143 after SIGTERM, 130 after Ctrl-C


def serve_in_main_thread(state: ServeState, server, sock: socket.socket) -> list[int]:
    """The engine loop on this (the main) thread, HTTP on another, until SIGTERM or Ctrl-C (returned,
    if any arrived): then uvicorn stops taking connections and lets requests in flight finish (or
    cancels them after the drain time), and its lifespan's end stops the engine loop. A second
    Ctrl-C cancels everything at once."""
    caught: list[int] = []

    def on_signal(signum, frame) -> None:
        caught.append(signum)
        received.signal = signum
        if server.should_exit and signum == signal.SIGINT:
            server.force_exit = True
            state.loop.cancel_all()
        server.should_exit = True

    def http() -> None:
        try:
            server.run(sockets=[sock])
        finally:
            state.loop.stop(timeout=0)  # whatever ended uvicorn ends the engine loop too

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=http, name="pensieve-http", daemon=True)
    try:
        thread.start()
        state.loop.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.should_exit = True
        thread.join(SHUTDOWN_BACKSTOP_S)
    return caught
