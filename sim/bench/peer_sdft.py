"""The peer of `fleetmind bench consolidate`: TRL's SDFTTrainer on our model, sessions,
prompts, adapter and steps, and the harness that trains either method in a process of its
own so that its peak memory is its own.

The peer is set up as close to our OPSD as TRL 1.16 allows, so the benchmark compares
trainers, not settings:
- adapter: the very PEFT model `bench_adapter(model)` builds for ours (A
  frozen from the seed, only B trains). TRL takes a ready PEFT model; with
  `teacher_model_kind="base"` its teacher is that model with the adapter disabled: the
  frozen base, one copy of the weights, as ours.
- prompts: the user turns of each scrubbed session (our `Lesson.probes`), as chat prompts;
  privileged context: the scrubbed transcript. TRL writes the teacher's prompt as one user
  turn, `teacher_prompt_template` filled with the context's and the prompt's text. We give
  it the transcript rendered as the chat it was, placed before the prompt, so the teacher's
  tokens equal ours exactly (checked before training): the toy model only ever read context
  as chat turns, and a format it never saw would measure the format, not the trainer.
- objective: full-vocabulary reverse KL (distillation_alpha=1) on the student's own samples
  at our temperature and length (TRL also divides the loss's logits by the temperature; at
  our 1.0 that changes nothing), the first `skip_first` tokens skipped, per-sequence mean;
  top-K of the student plus a tail bucket when ours uses one (`top_k` set, or automatic and
  the vocabulary above `distill_config.FULL_KL_MAX_VOCAB`), as ours. No importance-sampling
  clip (ours has none; at one step per generation TRL would not apply it anyway).
- optimisation: the same Adam (our lr, no weight decay), constant rate, no gradient clipping,
  `prompts_per_step` prompts x `samples_per_prompt` samples per step, `steps` steps per half,
  a fresh optimiser per half (as `consolidate` makes one per call), without gradient
  checkpointing: TRL's defaults (bf16 autocast, checkpointing, linear decay, clipping at 1,
  top-100 generalised JSD) are changed to ours.
- placement: the model loaded on our device in our dtype (fp32 on the CPU unless the bench
  is told otherwise); in bf16 or fp16 TRL trains under its mixed precision of that dtype
  (`precision_args`), where ours runs the base in it without autocast and its float32
  adapter in float32.
What the peer has not, by design: dreams, replay, the forgetting guard, and the teacher's
KV-cached context (it re-reads the transcript for every sample).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from fleetmind.client import lora
from fleetmind.client.consolidate import lessons_from
from fleetmind.client.distill_config import DistillConfig, resolve_top_k
from fleetmind.client.lessons import Lesson
from fleetmind.client.model import load_model
from fleetmind.client.store import Session
from fleetmind.client.tokens import chat_ids
from fleetmind.sim.bench.consolidate import bench_adapter, halves, measured, run_opsd

METHODS = ("ours", "peer")
_MODULE = "fleetmind.sim.bench.peer_sdft"


def run_peer(model_dir: Path, sessions: Sequence[Session], cfg: DistillConfig,
             workdir: Path, tensors: bool = False) -> tuple[Any, Any, dict[str, float]]:
    """SDFTTrainer over the sessions in the same two halves as `run_opsd`:
    (PEFT model, tokenizer, `measured` cost, with `tensors` passed on). Needs trl 1.16 (the
    `bench` extra)."""
    import torch
    from datasets import Dataset
    from trl.experimental.sdft import SDFTTrainer

    model, tokenizer = load_model(model_dir, dtype=cfg.dtype, device=cfg.device)
    peft_model = bench_adapter(model)
    # The same top-K as ours: an automatic one resolved from this model's vocabulary.
    cfg = replace(cfg, top_k=resolve_top_k(cfg.top_k, model.config.vocab_size))
    steps = 0
    with measured(model, tensors) as cost:
        for number, half in enumerate(halves(sessions)):
            pairs = _prompt_pairs(lessons_from(half)[0], cfg.prompts_per_step)
            rows = [{"prompt": list(probe),
                     "privileged_context": privileged_context(tokenizer, lesson.context)}
                    for lesson, probe in pairs]
            optimizer = torch.optim.Adam(lora.trainable_parameters(peft_model), lr=cfg.lr)
            trainer = SDFTTrainer(model=peft_model,
                                  args=sdft_config(cfg, workdir / f"sdft-{number}"),
                                  train_dataset=Dataset.from_list(rows),
                                  processing_class=tokenizer, optimizers=(optimizer, None))
            _check_same_inputs(trainer, tokenizer, pairs, rows)
            _count_distilled(trainer, cost)
            trainer.train()
            steps += trainer.state.global_step
    cost["steps"] = steps
    return peft_model, tokenizer, cost


def sdft_config(cfg: DistillConfig, output_dir: Path) -> Any:
    """TRL's config with our settings (module docstring: what differs from TRL's defaults);
    `cfg.top_k` already resolved (`distill_config.resolve_top_k`): -1 is not TRL's to read."""
    from trl.experimental.sdft import SDFTConfig

    loss: dict[str, Any]
    if cfg.top_k > 0:
        loss = {"distillation_mode": "topk_logits", "distillation_topk": cfg.top_k,
                "distillation_add_tail": True}
    else:
        loss = {"distillation_mode": "full_logits"}
    return SDFTConfig(
        output_dir=str(output_dir), max_steps=cfg.steps, seed=cfg.seed,
        per_device_train_batch_size=cfg.prompts_per_step * cfg.samples_per_prompt,
        num_generations=cfg.samples_per_prompt, gradient_accumulation_steps=1,
        learning_rate=cfg.lr, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
        gradient_checkpointing=False, **precision_args(cfg),
        max_prompt_length=None, max_completion_length=cfg.max_new_tokens,
        temperature=cfg.temperature, top_k=0, top_p=1.0,
        distillation_alpha=1.0, distillation_is_clip=None, num_loss_tokens_to_skip=cfg.skip_first,
        teacher_model_kind="base", generate_from_teacher=False,
        teacher_prompt_template="{privileged_context}{prompt}",
        report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
        **loss)


def precision_args(cfg: DistillConfig) -> dict[str, Any]:
    """TrainingArguments' placement for cfg.device and cfg.dtype: the CPU only when ours runs
    there (else the Trainer takes the GPU), and mixed precision in cfg.dtype, none in
    float32 (TRL's own default is bf16). Apart from `sdft_config` because TrainingArguments
    refuses bf16 off the CPU where there is no GPU: a test on the CPU checks these."""
    return {"use_cpu": cfg.device == "cpu", "bf16": cfg.dtype == "bfloat16",
            "fp16": cfg.dtype == "float16"}


def privileged_context(tokenizer: Any, context: Sequence[dict[str, str]]) -> str:
    """The transcript as the text that, put before a prompt's text in one user turn, renders
    the same chat as the transcript's turns followed by that prompt's user turn: the chat
    template rendered around a marker both ways, and the difference kept."""
    marker = "\u2063fleetmind-prompt\u2063"
    alone = _render(tokenizer, [{"role": "user", "content": marker}])
    after = _render(tokenizer, [*context, {"role": "user", "content": marker}])
    opening, session_and_opening = alone[: alone.index(marker)], after[: after.index(marker)]
    if not session_and_opening.startswith(opening):
        raise ValueError("the chat template does not open a conversation the same way whatever "
                         "its turns; the peer's teacher prompt cannot match ours")
    return session_and_opening[len(opening):]


def _render(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _prompt_pairs(lessons: Sequence[Lesson], prompts_per_step: int
                  ) -> list[tuple[Lesson, tuple[dict[str, str], ...]]]:
    """Every (session, user turn), repeated until a step's worth of distinct rows exist: TRL's
    sampler drops an epoch's incomplete last batch, so fewer rows than `prompts_per_step`
    would train nothing (ours samples with replacement and has no such floor)."""
    pairs = [(lesson, probe) for lesson in lessons for probe in lesson.probes]
    if not pairs:
        raise ValueError("nothing to consolidate: no sessions given")
    return pairs * math.ceil(prompts_per_step / len(pairs))


def _check_same_inputs(trainer: Any, tokenizer: Any,
                       pairs: Sequence[tuple[Lesson, tuple[dict[str, str], ...]]],
                       rows: list[dict[str, Any]]) -> None:
    """The peer's student must read each prompt alone and its teacher the transcript then the
    prompt, token for token as ours do, through TRL's own composition and tokenisation (its
    private `_tokenize_prompts`: trl is pinned to 1.16)."""
    prompts = [row["prompt"] for row in rows]
    contexts = [row["privileged_context"] for row in rows]
    builder = trainer.teacher_context_builder
    student = trainer._tokenize_prompts(prompts)
    teacher = trainer._tokenize_prompts(builder.select_generation_prompts(prompts, contexts))
    ours_student = [chat_ids(tokenizer, probe, generation=True) for _, probe in pairs]
    ours_teacher = [chat_ids(tokenizer, [*lesson.context, *probe], generation=True)
                    for lesson, probe in pairs]
    if [list(ids) for ids in student] != ours_student:
        raise ValueError("the peer's student prompts differ from ours token by token")
    if [list(ids) for ids in teacher] != ours_teacher:
        raise ValueError("the peer's teacher prompts differ from ours token by token")


def _count_distilled(trainer: Any, cost: dict[str, float]) -> None:
    """Adds the completion tokens that enter the peer's loss (TRL's loss mask: the student's
    own samples, the first `skip_first` left out) to cost["distilled_tokens"], as ours counts
    them. Through TRL's private `_compute_teacher_student_logits` (trl is pinned to 1.16)."""
    score = trainer._compute_teacher_student_logits

    def counted(*args: Any, **kwargs: Any) -> Any:
        logits = score(*args, **kwargs)
        cost["distilled_tokens"] += int(logits.loss_mask.sum())
        return logits

    trainer._compute_teacher_student_logits = counted


# ---- one method, one process -----------------------------------------------------------------

def train_in_subprocess(method: str, model_dir: Path, sessions: Sequence[Session],
                        cfg: DistillConfig, workdir: Path, threads: int = 1,
                        tensors: bool = False) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Trains with `method` ("ours": `run_opsd`, "peer": `run_peer`) in a fresh Python
    process and returns the trained B and the cost measured there, so the peak memory is that
    method's own, not shared with, or inherited from, the bench or the other method.

    Both run on `threads` torch threads, recorded in the cost. The count is fixed because
    torch's default (one per core) collapses when another process shares the cores: on 2
    shared cores the full run took 166 s (ours) and 45 s (the peer) at the default, against
    15 s and 10.5 s on one thread. The device and dtype are cfg's. tensors: take the memory
    measure too (`consolidate.memory_peak`: on the CPU the peak tensor memory, which slows
    the run; on a GPU the CUDA allocator's peak)."""
    from safetensors.numpy import load_file

    if method not in METHODS:
        raise ValueError(f"method={method!r}: use one of {', '.join(METHODS)}")
    job = Path(tempfile.mkdtemp(prefix=f"{method}-", dir=workdir))
    (job / "sessions.jsonl").write_text(
        "".join(json.dumps(session.to_dict()) + "\n" for session in sessions))
    (job / "config.json").write_text(json.dumps(asdict(cfg)))
    done = subprocess.run([sys.executable, "-m", _MODULE, method, str(model_dir), str(job),
                           "--threads", str(threads), *(["--tensors"] if tensors else [])],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{method}: training in its own process failed "
                           f"(exit {done.returncode}):\n{done.stderr[-4000:]}")
    return load_file(str(job / "b.safetensors")), json.loads((job / "cost.json").read_text())


def main(argv: Sequence[str] | None = None) -> int:
    """The subprocess: METHOD MODEL_DIR JOB_DIR [--threads N] [--tensors], JOB_DIR holding
    sessions.jsonl and config.json; writes b.safetensors and cost.json there."""
    import torch
    from safetensors.numpy import save_file

    parser = argparse.ArgumentParser(prog=f"python -m {_MODULE}", description=main.__doc__)
    parser.add_argument("method", choices=METHODS)
    parser.add_argument("model", type=Path)
    parser.add_argument("job", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tensors", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sessions = [Session.from_dict(json.loads(line))
                for line in (args.job / "sessions.jsonl").read_text().splitlines()]
    cfg = DistillConfig(**json.loads((args.job / "config.json").read_text()))
    train = run_peer if args.method == "peer" else run_opsd
    model, _, cost = train(args.model, sessions, cfg, args.job, args.tensors)
    cost["threads"] = args.threads
    save_file(lora.get_b(model), str(args.job / "b.safetensors"))
    (args.job / "cost.json").write_text(json.dumps(cost))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
