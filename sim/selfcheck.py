"""`pensieve selfcheck [--device cuda|cpu] [--out DIR] [--small]`: one command that tells whether this
device serves correctly and how well the simulator predicts it.

1. Equivalence: pensieve under forced swaps, drops and suspensions against stateless recompute, on a
   random Llama and (unless --small) the built-in SmolLM2, in the device's default precision, judged
   by `executor.equivalence` (exact in fp32; within a stated tolerance in fp16/bf16).
2. A quick profile of the device (`pensieve profile --quick`).
3. A small validation on that profile (`pensieve validate`): a real run and its simulation compared.
4. A one-page report, report.md and report.json, with versions, the device and each check's figures.

Like validation it drives both sides, so it lives here and imports the executor lazily. On a GPU the
whole form takes a few minutes; `--small` (the random model only, a tiny profile) is what CI runs.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import yaml

# Four conversations of three turns, 16-token chunks, a device tier that holds about two of them and
# a small host tier: every run swaps out and in, drops leading chunks and suspends decodes.
TURNS = [[40, 25, 30], [55, 20, 35], [70, 30, 20], [45, 35, 25]]
NEW_TOKENS = 24
CHUNK = 16
DEVICE_SLOTS, HOST_SLOTS = 20, 8


def _serve(engine, prompts: list[list[list[int]]]) -> dict:
    """Every turn on a step-count clock (deterministic), each conversation's next turn two steps after
    its answer; the logits of every step keyed by the context they predict after."""
    rows: dict = {}

    def hook(request_ids, logits) -> None:
        for rid, row in zip(request_ids, logits):
            rows[tuple(engine.conversation_ids(engine.requests[rid].conversation_id))] = row.float().cpu().clone()

    engine.logits_hook = hook
    n = len(prompts)
    turn, ready, busy, step = [0] * n, [2 * c for c in range(n)], [False] * n, 0
    while True:
        for c in range(n):
            if not busy[c] and turn[c] < len(prompts[c]) and ready[c] <= step:
                engine.add_request(c, prompts[c][turn[c]], NEW_TOKENS, float(step))
                turn[c] += 1
                busy[c] = True
        if engine.scheduler.idle and all(turn[c] == len(prompts[c]) for c in range(n)):
            return rows
        step += 1
        _, finished = engine.step(float(step))
        for request in finished:
            busy[request.conversation_id] = False
            ready[request.conversation_id] = step + 2


def equivalence_check(model: str | None, device: str) -> dict:
    """Pensieve against stateless on one model; the verdict and what the cache did."""
    import torch

    from executor.engine import Engine, EngineConfig
    from executor.equivalence import compare
    from executor.models import load_model
    from pensieve.config import SchedulerConfig

    loaded = load_model(model, device)
    vocab = loaded.dims["vocab_size"]
    g = torch.Generator().manual_seed(0)
    prompts = [[torch.randint(256, vocab, (n,), generator=g).tolist() for n in conv] for conv in TURNS]
    scheduler = SchedulerConfig(decode_reserve=0.0, swap_out_threshold=0.25)
    reference = _serve(Engine(loaded, EngineConfig(policy="stateless", device_slots=64, host_slots=0,
                                                   chunk_tokens=CHUNK)), prompts)
    engine = Engine(loaded, EngineConfig(policy="pensieve", device_slots=DEVICE_SLOTS, host_slots=HOST_SLOTS,
                                         chunk_tokens=CHUNK, scheduler=scheduler))
    candidate = _serve(engine, prompts)
    verdict = compare(reference, candidate, loaded.dims["dtype"])
    stats = engine.cache.stats
    forced = {"swap_in_chunks": stats.swap_in_chunks, "swap_out_chunks": stats.swap_out_chunks,
              "dropped_chunks": stats.dropped_chunks, "suspensions": engine.scheduler.suspensions}
    missing = [k for k, v in forced.items() if not v]
    summary = verdict.summary() + f"; attention kernel {engine.runner.attention_backend}; forced " + ", ".join(f"{k} {v}" for k, v in forced.items())
    if missing:
        summary += f" (never happened: {', '.join(missing)}: the check proved less than it should)"
    return {"check": f"equivalence: {loaded.name}", "ok": verdict.ok and not missing,
            "summary": summary, "dtype": loaded.dims["dtype"], "forced": forced,
            "failures": verdict.failures[:5]}


def profile_check(model: str | None, device: str, out: Path, small: bool) -> dict:
    from pensieve.cli import main
    from pensieve.profile import load_profile

    path = out / "profile.yaml"
    argv = ["profile", "--device", device, "--quick", "--out", str(path)]
    argv += ["--model", model] if model else []
    argv += ["--chunk-tokens", str(CHUNK)] if small else []
    start = time.perf_counter()
    status = main(argv)
    seconds = time.perf_counter() - start
    if status != 0:
        return {"check": "profile", "ok": False, "summary": f"pensieve profile exited {status}"}
    profile = load_profile(path)
    copy = profile.tables["copy_s"]
    return {"check": "profile", "ok": True, "path": str(path), "seconds": seconds,
            "summary": f"{profile.device} ({profile.data.get('device_detail', '')}): quick profile in {seconds:.1f} s; "
                       f"copies {copy['host_to_device']['bandwidth_gb_s']:.3g} GB/s in, "
                       f"{copy['device_to_host']['bandwidth_gb_s']:.3g} GB/s out"}


def validation_check(model: str | None, device: str, out: Path, profile_path: Path) -> dict:
    from pensieve.cli import main
    from pensieve.models import DEFAULT_MODEL
    from pensieve.profile import load_profile

    profile = load_profile(profile_path)
    dims = {k: v for k, v in profile.model.to_dict().items() if k != "name"}
    scenario = {
        "name": "selfcheck", "seed": 0, "profile": str(profile_path),
        "model": {"name": DEFAULT_MODEL if model is None else model.removeprefix("random:"), **dims},
        "cache": {"device_gb": DEVICE_SLOTS * 2 * profile.model.kv_bytes_per_token * profile.chunk_tokens / 1e9,
                  "host_gb": 4 * HOST_SLOTS * profile.model.kv_bytes_per_token * profile.chunk_tokens / 1e9,
                  "chunk_tokens": profile.chunk_tokens, "policy": "pensieve"},
        "scheduler": {"max_batch_tokens": 512, "max_batch_requests": 8},
        "workload": {"type": "fixed", "conversations": 6, "turns": 3, "prompt_tokens": 48, "output_tokens": 16,
                     "arrival_rate": 4.0, "think_time": "none"},
        "run": {"device": device} | ({"model_path": model} if model else {}),
    }
    path = out / "validate.yaml"
    path.write_text(yaml.safe_dump(scenario, sort_keys=False))
    folder = out / "validate"
    status = main(["validate", str(path), "--out", str(folder), "--quiet", "--repeats", "2", "--no-speed-probe",
                   "--force"])
    result_path = folder / "validation.json"
    if not result_path.is_file():
        return {"check": "validation", "ok": False, "summary": f"pensieve validate exited {status}"}
    result = json.loads(result_path.read_text())
    rows = result.get("comparison", [])
    errors = ", ".join(f"{r['metric']} {r['error']:+.1%}" for r in rows if r.get("error") is not None)
    verdict = result["verdict"]
    return {"check": "validation", "ok": status == 0,
            "summary": f"worst gated error {verdict['worst']:.1%} against {verdict['max_error']:.0%} "
                       f"({', '.join(verdict['gated'])}); simulated against real: {errors}",
            "folder": str(folder)}


def versions() -> dict:
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda": torch.version.cuda, "platform": platform.platform()}


def selfcheck_command(args) -> int:
    from executor.models import RANDOM_PREFIX, default_device, resolve_device

    device = str(resolve_device(args.device or default_device()))
    out = Path(args.out or "results/selfcheck")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    models = [RANDOM_PREFIX + "tiny-llama"] + ([] if args.small else [None])
    checks = [equivalence_check(model, device) for model in models]
    profiled = models[0] if args.small else None
    profile = profile_check(profiled, device, out, args.small)
    checks.append(profile)
    if profile["ok"]:
        checks.append(validation_check(profiled, device, out, Path(profile["path"])))
    report = {"device": device, "versions": versions(), "seconds": time.perf_counter() - start,
              "ok": all(c["ok"] for c in checks), "checks": checks}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    lines = [f"# pensieve selfcheck: {'PASS' if report['ok'] else 'FAIL'}", "",
             f"device {device}; " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
             f"{report['seconds']:.0f} s", ""]
    lines += [f"- {'ok  ' if c['ok'] else 'FAIL'} {c['check']}: {c['summary']}" for c in checks]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if report["ok"] else 1
