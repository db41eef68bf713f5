"""`fleetmind bench consolidate`: what one site's consolidation stores, and what it costs.

One site of the toy world, a fixed budget, every variant from the same base model and the
same sessions, in one run:
- ours: OPSD with dreams, replay and the forgetting guard;
- baselines: SFT on the raw transcripts; off-policy distillation (SFT on the teacher's
  greedy answers to the same prompts);
- ablations: without dreams, without replay, without the guard;
- the peer: TRL's SDFTTrainer on the same model, adapter, prompts and steps (peer_sdft.py).
Ours and the peer each train in a process of their own, so each one's peak memory is its
own, COST_RUNS times, alternated, and are measured alike (`measured`, `tensor_peak`): tokens
distilled per second and peak tensor memory are the headline, beside the RSS and every
forward pass's tokens per second; `COST_MEASURES` lists them and the table prints ours÷peer
for each. With `--model DIR` the comparison alone runs, on the CPU in fp32 or on a CUDA GPU
in bf16 or fp16 (`run_cost`), where the memory measure is the CUDA allocator's
(`MEMORY_MEASURES`); `--memory-only` takes that measure alone.
The sessions are consolidated in two halves, one after the other, so replay has earlier
lessons to keep. recovery = closed-book accuracy on the site's facts afterwards / the
teacher's in-context accuracy on them; forgetting = drop (points) of in-context accuracy on
fresh entities.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import resource
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

from fleetmind.client import distill, lora
from fleetmind.client.consolidate import consolidate_sessions, lessons_from
from fleetmind.client.distill_config import DistillConfig, resolve_top_k
from fleetmind.client.model import load_model
from fleetmind.client.replay import ReplayBuffer
from fleetmind.client.sampling import generate
from fleetmind.client.store import Session
from fleetmind.client.tokens import chat_ids, model_device, turn_end_ids
from fleetmind.sim import basemodel
from fleetmind.sim import world as W

LORA_SEED = 1
# The rank every number of this bench was measured at (docs/benchmarks.md), ours and the
# peer's alike; the fleet's own default (aggregation.manifest.DEFAULT_RANK) came later.
BENCH_RANK = 8


def bench_adapter(model: Any) -> Any:
    """The adapter both methods train: LoRA at BENCH_RANK, A frozen from LORA_SEED."""
    from fleetmind.client import lora

    return lora.attach_lora(model, seed=LORA_SEED, rank=BENCH_RANK, alpha=2.0 * BENCH_RANK)
PEER = "trl.experimental.sdft.SDFTTrainer"
# Timed runs of each method, alternated (ours, peer, ours, ...), each measure the median of
# a method's runs: one run's time varies too much for a single pair to tell the ratio
# (run-times: docs/benchmarks.md, after the headline table).
COST_RUNS = 3
# Steps per half in the separate run that measures peak tensor memory (`tensor_peak`): the
# profiler records every allocation and slows training, so that run is apart and shorter.
TENSOR_PEAK_STEPS = 10
# The measure that run takes, by device (`memory_peak`): the tensor meter on the CPU, the
# CUDA allocator's own peak on a GPU; (key in its cost, label, the target).
MEMORY_MEASURES = {"cpu": ("peak_tensor_mb", "peak tensor memory, MB", "≤ 0.6×"),
                   "cuda": ("peak_cuda_mb", "peak CUDA memory allocated, MB", "≤ 0.6×")}
# Where the cost comparison runs (`check_placement`).
BENCH_DEVICES = tuple(MEMORY_MEASURES)
# (key in `measured`'s cost, label, the issue's target on the ours÷peer ratio) on the CPU: the
# headline rate and memory first (`measured` and `tensor_peak` say why they are the fair
# ones), the plain ones after; `cost_measures` gives them for another device.
COST_MEASURES = (("distilled_tokens_per_s", "distilled tokens/s", "≥ 2×"),
                 MEMORY_MEASURES["cpu"],
                 ("peak_above_loaded_mb", "peak RSS above loaded, MB", ""),
                 ("tokens_per_s", "forward tokens/s", ""),
                 ("peak_rss_mb", "peak RSS, MB", ""),
                 ("seconds", "seconds", ""))


def cost_measures(device: str, memory_only: bool = False) -> tuple[tuple[str, str, str], ...]:
    """The measures a comparison on `device` takes, as COST_MEASURES: its memory measure
    (MEMORY_MEASURES) in the CPU's place, alone with `memory_only` (no timed runs)."""
    memory = MEMORY_MEASURES[device]
    if memory_only:
        return (memory,)
    return tuple(memory if measure == MEMORY_MEASURES["cpu"] else measure
                 for measure in COST_MEASURES)


def check_placement(device: str, dtype: str) -> str:
    """`dtype`'s full name, once the comparison can run on `device` in it here: a GPU that is
    not there is refused before any model loads or process starts, not minutes later by a
    child process."""
    from fleetmind.client.model import dtype_name

    if device not in BENCH_DEVICES:
        raise ValueError(f"--device {device}: use cpu or cuda")
    try:
        name = dtype_name(dtype)
    except ValueError:
        raise ValueError(f"--dtype {dtype}: use fp32, bf16 or fp16") from None
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"--device cuda: torch {torch.__version__} sees no CUDA GPU here "
                             "(torch.cuda.is_available() is false); run on a machine with an "
                             "NVIDIA GPU and a CUDA build of torch, or use --device cpu")
        if name == "bfloat16" and not torch.cuda.is_bf16_supported():
            raise ValueError("--dtype bf16: this GPU has no bfloat16 "
                             "(torch.cuda.is_bf16_supported() is false); use --dtype fp16")
    return name


def _general(model: Any, tokenizer: Any, world: W.World) -> float:
    by_facts = basemodel.measure(model, tokenizer, world)["incontext_by_facts"]
    return sum(by_facts.values()) / len(by_facts)


def halves(sessions: Sequence[Session]) -> list[list[Session]]:
    """The two batches every method consolidates, one after the other."""
    middle = len(sessions) // 2
    return [list(sessions[:middle]), list(sessions[middle:])]


@contextmanager
def measured(model: Any, tensors: bool = False) -> Iterator[dict[str, float]]:
    """The cost of the training done inside the block, counted the same way for every method.

    distilled_tokens: the completion tokens of the student's own samples that enter the
    distillation loss, which the method adds inside the block (ours: `DistillStats.tokens`;
    the peer: its loss mask). The work both deliver, whatever each spends on it, so the
    headline rate; `distilled_tokens_per_s` divides it by the block's wall time.
    tokens: every input position the forward passes of `model` (the base causal LM, under its
    PEFT wrapper) see: each prompt prefill and decoding step of sampling, the student's and
    the teacher's passes, padding included; a KV-cached context counts once, when encoded.
    It credits a method for every pass it makes, the peer's re-reading of the session for
    every sample as ours' forgetting guard, so it is kept but is not the headline.
    seconds: wall time of the block; cpu_seconds: CPU time of the process's threads in it (a
    check on wall time when the machine is shared). rss_before_mb: the process's high-water
    mark on entry (loading may set it: the benchmark's first run set its peak before training
    began); the mark is then reset (Linux's clear_refs), so peak_rss_mb is the block's own
    high-water mark; rss_loaded_mb: the resident set on entry (imports, loaded model);
    peak_above_loaded_mb = peak_rss_mb - rss_loaded_mb, what the training added to the resident
    set (kept, not judged: `tensor_peak` says why). peak_reset: whether the reset worked; if
    not, the peak is the process's and may predate the block. tensors: also the memory
    measure of the device `model` runs on (`memory_peak`), which on the CPU slows the block,
    so its times are then not the method's. On a GPU the clock stops once its queued work is
    done. One method per process, as in `peer_sdft.train_in_subprocess`."""
    import torch

    cost: dict[str, float] = {"tokens": 0, "distilled_tokens": 0,
                              "rss_before_mb": round(_peak_rss_mb(), 1),
                              "peak_reset": _reset_peak_rss(),
                              "rss_loaded_mb": round(_rss_mb(), 1)}

    def count(_module: Any, args: tuple, kwargs: dict) -> None:
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        cost["tokens"] += int(ids.numel())

    handle = model.register_forward_pre_hook(count, with_kwargs=True)
    profiler: AbstractContextManager[dict[str, float]] = (memory_peak(model) if tensors
                                                          else nullcontext({}))
    started, cpu_started = time.perf_counter(), time.process_time()
    try:
        with profiler as peak:
            yield cost
            if torch.cuda.is_initialized():
                torch.cuda.synchronize()
    finally:
        handle.remove()
    cost.update(peak)
    seconds = time.perf_counter() - started
    cost["seconds"] = round(seconds, 2)
    cost["cpu_seconds"] = round(time.process_time() - cpu_started, 2)
    cost["tokens_per_s"] = round(cost["tokens"] / seconds, 1)
    cost["distilled_tokens_per_s"] = round(cost["distilled_tokens"] / seconds, 1)
    cost["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    cost["peak_above_loaded_mb"] = round(cost["peak_rss_mb"] - cost["rss_loaded_mb"], 1)


def memory_peak(model: Any) -> AbstractContextManager[dict[str, float]]:
    """The memory meter for the device `model` runs on (MEMORY_MEASURES): the tensor meter
    counts only CPU tensors, the CUDA allocator only its own."""
    device = model_device(model)
    return cuda_peak(device) if device.type == "cuda" else tensor_peak()


@contextmanager
def cuda_peak(device: Any) -> Iterator[dict[str, float]]:
    """peak_cuda_mb: `torch.cuda.max_memory_allocated` on `device` over the block, the peak
    reset on entry: the allocator's own count of the most its tensors held at once, what
    `tensor_peak` stands in for on the CPU. Unlike that one it includes the tensors from before
    the block, the loaded model's weights: the same for every method."""
    import torch

    result: dict[str, float] = {}
    torch.cuda.reset_peak_memory_stats(device)
    yield result
    result["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 2)


@contextmanager
def tensor_peak() -> Iterator[dict[str, float]]:
    """peak_tensor_mb: the most memory that tensors allocated inside the block held at once:
    the CPU's counterpart of `torch.cuda.max_memory_allocated`, the measure a GPU run would
    judge. On the toy model the RSS is not: our consolidation's live tensors peak at 8 MB
    while its resident set grows by 38, the allocator keeping freed pages and the runtime
    its own buffers, alike for every method. Tensors from before the block (the loaded
    model) are not counted. Counted as ops run (`tensor_memory.LiveTensorBytes`), in memory
    that does not grow with the run: torch.profiler's record of every allocation, used
    before, was killed for lack of memory at the SmolLM2-135M shape (docs/real-shapes.md);
    the two agree within a few bytes on a small model (tests/unit/test_bench_consolidate.py)."""
    from fleetmind.sim.bench.tensor_memory import LiveTensorBytes

    result: dict[str, float] = {}
    with LiveTensorBytes() as meter:
        yield result
    result["peak_tensor_mb"] = round(meter.peak / 2**20, 2)


def run_opsd(model_dir: Path, sessions: Sequence[Session], cfg: DistillConfig,
             workdir: Path, tensors: bool = False) -> tuple[Any, Any, dict[str, float]]:
    """Our OPSD over the sessions in two halves, on cfg.device in cfg.dtype: (PEFT model,
    tokenizer, `measured` cost, with `tensors` passed on)."""
    model, tokenizer = load_model(model_dir, dtype=cfg.dtype, device=cfg.device)
    peft_model = bench_adapter(model)
    replay = ReplayBuffer(workdir / f"replay-{time.monotonic_ns()}.db")
    steps = 0
    # Replay rehearses dreams of the first half while the second trains; it finds their
    # sessions here, as a site finds them in its store.
    by_id = {session.id: session for session in sessions}
    try:
        with measured(model, tensors) as cost:
            for half in halves(sessions):
                result = consolidate_sessions(peft_model, tokenizer, half, cfg, site="bench",
                                              base_version=0, seed=LORA_SEED, replay=replay,
                                              earlier=by_id.__getitem__,
                                              guard=guard_prompts(), progress=False)
                steps += result.stats.steps
                cost["distilled_tokens"] += result.stats.tokens
    finally:
        replay.close()
    cost["steps"] = steps
    return peft_model, tokenizer, cost


def bench_world(general_tasks: int = 800) -> W.World:
    """One site of the toy world; 800 general tasks (200 per size) put the forgetting
    measure's standard error near one point."""
    return W.make_world(W.WorldSpec(seed=0, sites=1, general_tasks=general_tasks))


def guard_prompts() -> list[list[dict[str, str]]]:
    """The world's guard set: general in-context tasks drawn apart from those measured."""
    return [W.task_prompt(task) for task in bench_world(1).guard]


def with_b(model_dir: Path, b: dict[str, Any]) -> tuple[Any, Any]:
    """The base model with our adapter (A from LORA_SEED) carrying `b`: a trained state that
    came back from a subprocess, ready to be scored."""
    model, tokenizer = load_model(model_dir)
    peft_model = bench_adapter(model)
    lora.set_b(peft_model, b)
    return peft_model, tokenizer


def run_sft(model_dir: Path, sessions: Sequence[Session], cfg: DistillConfig,
            pairs: Callable[[Any, Any, list[Session]], list[tuple[list[int], list[int]]]]
            ) -> tuple[Any, Any]:
    """Supervised fine-tuning of B on (prompt ids, target ids) pairs, same steps and lr."""
    model, tokenizer = load_model(model_dir)
    peft_model = bench_adapter(model)
    for half in halves(sessions):
        distill.supervise(peft_model, tokenizer, pairs(peft_model, tokenizer, half), cfg)
    return peft_model, tokenizer


def transcript_pairs(model: Any, tokenizer: Any, sessions: list[Session]
                     ) -> list[tuple[list[int], list[int]]]:
    """The raw transcript, whole, as language-model targets."""
    return distill.transcript_examples(tokenizer, lessons_from(sessions)[0])


def teacher_answer_pairs(model: Any, tokenizer: Any, sessions: list[Session]
                         ) -> list[tuple[list[int], list[int]]]:
    """Off-policy: the teacher's greedy answer (session in context) to each session prompt."""
    stop = turn_end_ids(tokenizer)
    out = []
    for lesson in lessons_from(sessions)[0]:
        for probe in lesson.probes:
            teacher = chat_ids(tokenizer, [*lesson.context, *probe], generation=True)
            with lora.adapter_disabled(model):
                (answer,), _ = generate(model, tokenizer, [teacher], 1, 16, 0.0, stop)
            out.append((chat_ids(tokenizer, probe, generation=True), answer))
    return out


def median_cost(runs: Sequence[dict[str, float]]) -> dict[str, float]:
    """One method's cost over its runs: each measure's median (COST_RUNS says why)."""
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def compare_cost(model_dir: Path, sessions: Sequence[Session], cfg: DistillConfig,
                 out: Path, runs: int = COST_RUNS, threads: int = 1, memory_only: bool = False
                 ) -> tuple[dict[str, Any], dict[str, float], dict[str, Any],
                            dict[str, float] | None, dict[str, list[dict[str, float]]]]:
    """Ours against the peer on `model_dir`, on cfg.device in cfg.dtype: `runs` runs of each,
    alternated, each in a fresh process on `threads` torch threads (so each peak is its own
    and both see the machine in the same state), then one profiled run each for the memory
    measure (MEMORY_MEASURES); `memory_only`: that run alone. Returns (the trained B of each
    method's last timed run, ours' median cost, the peer's entry (its median cost, or why it
    did not run), ours÷peer per `cost_measures` or None, every timed run's cost)."""
    from fleetmind.sim.bench import peer_sdft  # it imports this module, so not at the top

    methods = ["ours"]
    peer: dict[str, Any] = {"name": PEER}
    if importlib.util.find_spec("trl") is None:
        peer["status"] = "trl not installed: pip install -e '.[bench]'"
    else:
        methods.append("peer")
        peer["version"] = importlib.metadata.version("trl")
    every: dict[str, list[dict[str, float]]] = {method: [] for method in methods}
    trained = {}
    for _ in range(0 if memory_only else runs):
        for method in methods:
            trained[method], cost = peer_sdft.train_in_subprocess(method, model_dir, sessions,
                                                                  cfg, out, threads=threads)
            every[method].append(cost)
    costs = {method: median_cost(every[method]) if every[method] else {} for method in methods}

    # The memory measure, each method again in a process of its own, under the meter.
    profiled = replace(cfg, steps=min(cfg.steps, TENSOR_PEAK_STEPS))
    memory, _, _ = MEMORY_MEASURES[cfg.device]
    for method, cost in costs.items():
        _, profiled_cost = peer_sdft.train_in_subprocess(method, model_dir, sessions, profiled,
                                                         out, threads=threads, tensors=True)
        cost[memory] = profiled_cost[memory]
        cost["tensor_peak_steps_per_half"] = profiled.steps
    ours_cost = costs["ours"]
    ratios = None
    if "peer" in costs:
        peer.update(costs["peer"])
        ratios = {key: round(ours_cost[key] / peer[key], 2)
                  for key, _, _ in cost_measures(cfg.device, memory_only)}
    return trained, ours_cost, peer, ratios, every


def run(out: Path, quick: bool = False, model_dir: Path | None = None, steps: int | None = None,
        runs: int | None = None, threads: int = 1, device: str = "cpu", dtype: str = "fp32",
        memory_only: bool = False) -> dict[str, Any]:
    """The whole benchmark on the toy model; with `model_dir`, the cost comparison alone on
    that model folder (`run_cost`, which alone takes `device`, `dtype` and `memory_only`).
    steps: per half (default: the distillation's, 10 when quick); runs: alternated runs of
    each method (default COST_RUNS, 1 when quick)."""
    from rich.console import Console

    if model_dir is not None:
        return run_cost(out, model_dir, quick=quick, steps=steps, runs=runs, threads=threads,
                        device=device, dtype=dtype, memory_only=memory_only)
    if (device, check_placement(device, dtype), memory_only) != ("cpu", "float32", False):
        raise ValueError("--device, --dtype and --memory-only need --model DIR: the toy "
                         "model's benchmark scores every variant on the CPU in fp32")
    out.mkdir(parents=True, exist_ok=True)
    model_dir = basemodel.toy_model_path()
    world = bench_world(80 if quick else 800)
    site = world.sites[0]
    sessions = [Session.from_dict(s) for s in site.sessions]
    cfg = DistillConfig(steps=steps or (10 if quick else DistillConfig().steps))

    base, tokenizer = load_model(model_dir)
    teacher = basemodel.fact_accuracy(base, tokenizer, site.facts,
                                      lambda f: W.context_prompt([f], f))
    closed_before = basemodel.fact_accuracy(base, tokenizer, site.facts)
    general_before = _general(base, tokenizer, world)

    def score(model: Any, tok: Any) -> dict[str, float]:
        closed = basemodel.fact_accuracy(model, tok, site.facts)
        return {"recovery": round(closed / teacher, 4) if teacher else 0.0,
                "closed_book": closed,
                "forgetting_points": round(100 * (general_before - _general(model, tok, world)),
                                           2)}

    # Ours and the peer first, alternated, each run in a fresh process: their costs are
    # compared, so each peak is its own and both see the machine in the same state.
    trained, ours_cost, peer, ratios, every = compare_cost(
        model_dir, sessions, cfg, out, runs or (1 if quick else COST_RUNS), threads)
    methods = list(trained)
    results: dict[str, dict[str, float]] = {
        method: {**score(*with_b(model_dir, trained[method])),
                 "seconds": (ours_cost if method == "ours" else peer)["seconds"]}
        for method in methods}
    if "peer" in results:
        peer.update({k: results["peer"][k] for k in
                     ("recovery", "forgetting_points", "closed_book")})

    ablations = {"no_dreams": replace(cfg, dream_ratio=0.0),
                 "no_replay": replace(cfg, replay_ratio=0.0),
                 "no_guard": replace(cfg, guard_weight=0.0)}
    for name, variant in ablations.items():
        model, tok, cost = run_opsd(model_dir, sessions, variant, out)
        results[name] = {**score(model, tok), "seconds": cost["seconds"]}
    for name, pairs in (("sft_transcript", transcript_pairs),
                        ("offpolicy", teacher_answer_pairs)):
        model, tok = run_sft(model_dir, sessions, cfg, pairs)
        results[name] = score(model, tok)

    report = {
        **{k: results["ours"][k] for k in ("recovery", "forgetting_points")},
        "teacher_accuracy": teacher,
        "closed_book_before": closed_before,
        "closed_book_after": results["ours"]["closed_book"],
        "baselines": {k: results[k] for k in ("sft_transcript", "offpolicy")},
        "ablations": {k: results[k] for k in ablations},
        "ours": ours_cost,
        "peer": peer,
        "ratios": ratios,
        "config": {"distill": cfg.__dict__, "quick": quick, "model": str(model_dir),
                   "tensor_peak_steps_per_half": min(cfg.steps, TENSOR_PEAK_STEPS),
                   "cost_runs": len(every["ours"]), "threads": threads,
                   "seconds_per_run": {m: [c["seconds"] for c in every[m]] for m in methods},
                   "facts": len(site.facts), "sessions": len(sessions)},
    }
    (out / "consolidate.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(results, out / "consolidate.png")
    console = Console()
    console.print(_variants_table(results, f"consolidation, one site: teacher {teacher:.2f}, "
                                           f"closed-book before {closed_before:.2f}"))
    console.print(_cost_table(ours_cost, peer, ratios, COST_MEASURES))
    return report


# What `bench consolidate --model DIR` measures on any model folder, and what it leaves out:
# recovery, forgetting, the baselines and the ablations score answers about the toy world's
# facts, which only the toy model (trained on the world's grammar) can give.
MODEL_SCOPE = {
    "applies": ["cost against the peer: distilled tokens/s, peak tensor memory (on a GPU the "
                "CUDA allocator's peak), RSS, forward tokens/s, seconds (medians of alternated "
                "runs, each in its own process; `measures` lists those taken)"],
    "left_out": ["recovery and forgetting (toy-world accuracy: needs the toy model)",
                 "baselines (SFT on transcripts, off-policy distillation) and ablations (no "
                 "dreams, replay or guard): scored by recovery and forgetting"],
}
MODEL_REPORT = "consolidate-model.json"


def run_cost(out: Path, model_dir: Path, quick: bool = False, steps: int | None = None,
             runs: int | None = None, threads: int = 1, device: str = "cpu",
             dtype: str = "fp32", memory_only: bool = False) -> dict[str, Any]:
    """`bench consolidate --model DIR`: the cost comparison alone (MODEL_SCOPE), on the toy
    world's site sessions (plain English-like text, which a byte-level tokenizer encodes; a
    tokenizer that cannot, one mapping some of it to its unknown token, is refused), through
    the model's own chat template, both methods on `device` (cpu or cuda) with the base model
    in `dtype` (fp32, bf16 or fp16). memory_only: no timed runs, the memory run of each method
    alone (`compare_cost`); the report's `measures` lists what was measured. Writes
    DIR/consolidate-model.json (not consolidate.json, which `bench report` reads for the toy
    model's whole benchmark)."""
    from rich.console import Console

    from fleetmind.client.model import context_length

    dtype = check_placement(device, dtype)
    if memory_only and runs is not None:
        raise ValueError("--runs does not apply with --memory-only, which takes no timed runs")
    out.mkdir(parents=True, exist_ok=True)
    sessions = [Session.from_dict(s) for s in bench_world(1).sites[0].sessions]
    cfg = DistillConfig(steps=steps or (10 if quick else DistillConfig().steps),
                        device=device, dtype=dtype)
    measures = cost_measures(device, memory_only)
    model, tokenizer = load_model(model_dir)
    check_encodable(tokenizer, sessions)
    shape = {"architecture": (model.config.architectures or [type(model).__name__])[0],
             "parameters": sum(p.numel() for p in model.parameters()),
             "vocab_size": model.config.vocab_size,
             "context_length": context_length(model.config),
             "top_k": resolve_top_k(cfg.top_k, model.config.vocab_size)}
    del model
    _, ours_cost, peer, ratios, every = compare_cost(
        model_dir, sessions, cfg, out, runs or (1 if quick else COST_RUNS), threads, memory_only)
    report = {
        "scope": MODEL_SCOPE,
        "model": {"path": str(model_dir), **shape, **_build_report(model_dir)},
        "measures": [key for key, _, _ in measures],
        "ours": ours_cost,
        "peer": peer,
        "ratios": ratios,
        "config": {"distill": cfg.__dict__, "quick": quick, "memory_only": memory_only,
                   "tensor_peak_steps_per_half": min(cfg.steps, TENSOR_PEAK_STEPS),
                   "cost_runs": len(every["ours"]), "threads": threads,
                   "seconds_per_run": {m: [c["seconds"] for c in every[m]] for m in every},
                   "sessions": len(sessions)},
    }
    (out / MODEL_REPORT).write_text(json.dumps(report, indent=2) + "\n")
    console = Console()
    console.print(f"{model_dir}: {shape['architecture']}, {shape['parameters']:,} parameters, "
                  f"vocabulary {shape['vocab_size']:,}; measured: cost only (recovery, "
                  "forgetting, baselines and ablations need the toy model)")
    console.print(_cost_table(ours_cost, peer, ratios, measures))
    return report


def check_encodable(tokenizer: Any, sessions: Sequence[Session]) -> None:
    """Refuses a tokenizer that maps any of the sessions' text to its unknown token: the
    sessions would not say to the model what they say."""
    unknown = tokenizer.unk_token_id
    if unknown is None:
        return
    for session in sessions:
        for message in session.messages:
            if unknown in tokenizer.encode(message.content, add_special_tokens=False):
                raise ValueError(f"the tokenizer cannot encode the benchmark's sessions: "
                                 f"{message.content!r} has a token it does not know")


def _build_report(model_dir: Path) -> dict[str, Any]:
    """What `fleetmind model build-random` recorded of the folder (random weights, the shape it
    is like), if it built it."""
    report = model_dir / "report.json"
    if not report.is_file():
        return {}
    built = json.loads(report.read_text())
    return {k: built[k] for k in ("like", "random_weights", "overrides") if k in built}


def _variants_table(results: dict[str, dict[str, float]], title: str) -> Any:
    """Every variant's recovery and forgetting."""
    from rich.table import Table

    table = Table("variant", "recovery", "forgetting (points)", title=title)
    for name, row in results.items():
        table.add_row(name, f"{row['recovery']:.2f}", f"{row['forgetting_points']:+.1f}")
    return table


def _cost_table(ours: dict[str, float], peer: dict[str, Any], ratios: dict[str, float] | None,
                measures: Sequence[tuple[str, str, str]]) -> Any:
    """Ours against the peer, measure by measure (`cost_measures`: those taken), with
    ours÷peer and the issue's targets on the headline measures."""
    from rich.table import Table

    table = Table("measure", "ours", "peer", "ours÷peer", "target",
                  title=f"cost against {peer['name']}" + (f": {peer['status']}"
                                                          if "status" in peer else ""))
    for key, label, target in measures:
        table.add_row(label, f"{ours[key]:,.0f}", f"{peer[key]:,.0f}" if ratios else "",
                      f"{ratios[key]:.2f}×" if ratios else "", target)
    return table


def plot(results: dict[str, dict[str, float]], path: Path) -> Path:
    """Recovery and forgetting per variant, side by side: the comparison at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    left.barh(names, [results[n]["recovery"] for n in names], color="tab:blue")
    left.set_xlim(0, 1.05)
    left.set_xlabel("recovery (closed-book / teacher in context)")
    right.barh(names, [results[n]["forgetting_points"] for n in names], color="tab:red")
    right.axvline(2.0, color="grey", linestyle="--", linewidth=1, label="target ≤ 2")
    right.set_xlabel("forgetting (points of in-context accuracy)")
    right.legend(loc="lower right")
    left.invert_yaxis()
    figure.suptitle("one site's consolidation: ours, the peer, baselines and ablations")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _peak_rss_mb() -> float:
    """The process's resident high-water mark since it started or since the last reset."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def _reset_peak_rss() -> bool:
    """Resets the resident high-water mark to the resident set now (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _rss_mb() -> float:
    """The process's resident set now (Linux: /proc/self/statm counts pages)."""
    resident = int(Path("/proc/self/statm").read_text().split()[1])
    return resident * os.sysconf("SC_PAGE_SIZE") / 2**20
