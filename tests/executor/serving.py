"""A live `pensieve serve` app on 127.0.0.1 in this process, and stateless answers to compare with."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from executor.engine import Engine, EngineConfig
from executor.models import LoadedModel
from executor.serving.app import ServeState
from executor.serving.command import bind, build_state, make_server


@dataclass
class LiveServer:
    url: str
    state: ServeState

    @property
    def model(self) -> str:
        return self.state.model_name

    def check_invariants(self) -> None:
        """The core's own consistency checks, run on the engine thread between steps."""
        def check(engine: Engine) -> None:
            engine.scheduler.check_invariants()
            engine.cache.check_invariants()
        self.state.loop.call(check)

    def metric(self, sample: str) -> float:
        """One sample's value as /metrics renders it, e.g. 'pensieve_requests_total{finish_reason="abort"}'
        (0 when absent)."""
        for line in self.state.metrics.render().decode().splitlines():
            key, _, value = line.rpartition(" ")
            if key == sample:
                return float(value)
        return 0.0


@contextlib.contextmanager
def live_server(loaded: LoadedModel, config: EngineConfig, **options) -> Iterator[LiveServer]:
    """Serve `loaded` on a free port for the duration; stops the server and its engine thread after."""
    state = build_state(loaded, config, threads=1, **options)
    state.loop.start()
    sock = bind("127.0.0.1", 0)
    server = make_server(state, shutdown_timeout=2.0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield LiveServer(f"http://127.0.0.1:{sock.getsockname()[1]}", state)
    finally:
        server.should_exit = True
        thread.join(30)


def stateless_answer(loaded: LoadedModel, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy tokens of stateless recompute: a fresh engine computes the whole prompt, nothing kept."""
    engine = Engine(loaded, EngineConfig(policy="stateless", device_slots=512, host_slots=0))
    request = engine.add_request("c", prompt, max_tokens, 0.0)
    engine.run_until_idle()
    return engine.generated_ids(request.id)
