import math
import random

import numpy as np
import pytest
import torch

from fleetmind.aggregation.frozen_a import frozen_a
from fleetmind.client import distill, lora
from fleetmind.client.distill_config import (
    AUTO_TOP_K_TOKENS,
    FULL_KL_MAX_VOCAB,
    DistillConfig,
    resolve_top_k,
)
from fleetmind.client.distill_loss import backpropagate, completion_mask, reverse_kl
from fleetmind.client.dreams import dream
from fleetmind.client.guard import GuardExample, guard_examples, guard_reference, hold_references
from fleetmind.client.lessons import Lesson, LessonBatch, LessonPrompt
from fleetmind.client.model import load_model
from fleetmind.client.sampling import (
    SHARED_START_MIN,
    common_start,
    generate,
    greedy_confidence,
    read_prompts,
    sample,
)
from fleetmind.client.scoring import TeacherContexts, completion_logits
from fleetmind.client.tokens import chat_ids, pad_right, template_turn_end, turn_end_ids
from fleetmind.sim import world as W


@pytest.fixture
def student(toy_model_dir):
    model, tokenizer = load_model(toy_model_dir)
    return lora.attach_lora(model, seed=11, rank=4), tokenizer


def test_reverse_kl_matches_a_hand_computation() -> None:
    p_s = [0.7, 0.2, 0.1]
    p_t = [0.5, 0.25, 0.25]
    expected = sum(s * (math.log(s) - math.log(t)) for s, t in zip(p_s, p_t, strict=True))
    student_logits = torch.log(torch.tensor([[p_s]]))
    teacher_logits = torch.log(torch.tensor([[p_t]])) + 3.0  # a shift changes no probability
    got = reverse_kl(student_logits, teacher_logits)
    assert got.shape == (1, 1)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_top_k_with_tail_bucket_is_exact_when_the_tail_is_one_token() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 6), torch.randn(2, 3, 6)
    full = reverse_kl(s, t)
    # top 5 of 6 plus a bucket for the sixth is the same distribution
    assert torch.allclose(reverse_kl(s, t, top_k=5), full, atol=1e-5)
    # a coarser bucket can only lose information: KL never grows (data processing)
    assert bool((reverse_kl(s, t, top_k=2) <= full + 1e-5).all())


def test_frozen_a_is_public_and_b_starts_at_zero(student) -> None:
    model, _ = student
    layers = lora.lora_layers(model)
    assert layers, "LoRA attached to no module"
    for name, layer in layers.items():
        a = layer.lora_A["default"].weight
        assert not a.requires_grad
        expected = frozen_a(11, name, a.shape[0], a.shape[1])
        assert np.array_equal(a.detach().numpy(), expected)
    assert all(not b.any() for b in lora.get_b(model).values())


def lessons_and_guard(sessions: int = 2):
    world = W.make_world(W.WorldSpec(seed=21, sites=1))
    lessons = [Lesson.from_session(s["id"], s["messages"])
               for s in world.sites[0].sessions[:sessions]]
    guard = [W.context_prompt([W.Fact(**f) for f in t["facts"]], W.Fact(**t["asked"]))
             for t in world.general[:8]]
    return lessons, guard


def one_lesson_step(model, tokenizer, lesson, samples=4):
    """The teacher's cached context of `lesson` and one batch of the student's samples on its
    last prompt."""
    context_ids = chat_ids(tokenizer, lesson.context, generation=False)
    contexts = TeacherContexts.encode(model, {lesson.session_id: context_ids})
    prompt = LessonPrompt.encode(tokenizer, contexts, lesson, lesson.probes[-1])
    ys = sample(model, tokenizer, [prompt.student], samples, 8, 1.0,
                {tokenizer.eos_token_id})
    batch = LessonBatch([prompt], [0] * samples, ys)
    return contexts, batch


def test_gradients_reach_only_b(student) -> None:
    model, tokenizer = student
    lessons, _ = lessons_and_guard(1)
    cfg = DistillConfig(steps=1, dream_ratio=0, replay_ratio=0)
    contexts, batch = one_lesson_step(model, tokenizer, lessons[0])
    model.zero_grad(set_to_none=True)
    backpropagate(model, tokenizer, contexts, batch, [], None, cfg)
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad, "no gradient at all"
    assert all("lora_B" in n for n in with_grad), sorted(with_grad)[:3]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_B" in n for n in trainable)


def test_cached_teacher_context_gives_the_uncached_logits(student) -> None:
    model, tokenizer = student
    lessons, _ = lessons_and_guard(3)
    lessons = lessons[1:]
    contexts = TeacherContexts.encode(
        model, {lesson.session_id: chat_ids(tokenizer, lesson.context, generation=False)
                for lesson in lessons})
    # Prompts of both sessions, whose contexts differ in length (one is padded), in one pass;
    # two completions of different lengths continue each prompt, which is read once.
    assert len({len(ids) for ids in contexts.ids.values()}) == 2
    prompts = [(lesson, LessonPrompt.encode(tokenizer, contexts, lesson, p))
               for lesson in lessons for p in lesson.probes]
    owners = [i for i in range(len(prompts)) for _ in range(2)]
    ys = [[5 + j, 6, 7][: 1 + j % 3] for j in range(len(owners))]
    args = ([lesson.session_id for lesson, _ in prompts], [p.teacher_suffix for _, p in prompts],
            ys, owners, 0)
    cached, counts = contexts.log_probs(model, *args)
    again, _ = contexts.log_probs(model, *args)  # the held cache must not have grown
    assert counts == [len(y) for y in ys]
    for owner, y, got, got_again in zip(owners, ys, cached.split(counts), again.split(counts),
                                        strict=True):
        lesson, prompt = prompts[owner]
        full = torch.tensor([contexts.ids[lesson.session_id] + prompt.teacher_suffix + y])
        with torch.no_grad(), lora.adapter_disabled(model):
            plain = torch.log_softmax(model(input_ids=full).logits[0], dim=-1)
        plain = plain[-len(y) - 1:-1]  # the logits that predict y
        assert torch.allclose(got, plain, atol=1e-4)
        assert torch.allclose(got_again, plain, atol=1e-4)


def test_sessions_that_start_alike_are_held_as_each_alone_reads_it(student) -> None:
    """Contexts with a common start (a chat template's system turn) of SHARED_START_MIN+
    tokens: it is read once, and the held caches give each session's own plain logits."""
    model, _ = student
    start = [3 + (11 * i) % 60 for i in range(SHARED_START_MIN + 3)]
    ids = {"a": [*start, 40, 41, 42], "b": [*start, 43], "c": [*start, 44, 45]}
    assert common_start(list(ids.values())) == len(start)
    contexts = TeacherContexts.encode(model, ids)
    suffixes, ys = [[50], [51, 52], [53]], [[60, 61], [62], [63, 64, 65]]
    held, counts = contexts.log_probs(model, list(ids), suffixes, ys, [0, 1, 2], 0)
    for context, suffix, y, got in zip(ids.values(), suffixes, ys, held.split(counts),
                                       strict=True):
        with torch.no_grad():
            plain = torch.log_softmax(model(input_ids=torch.tensor([context + suffix + y]))
                                      .logits[0], dim=-1)[-len(y) - 1:-1]
        assert torch.allclose(got, plain, atol=1e-4)


@pytest.mark.parametrize("start", [0, SHARED_START_MIN + 4])
def test_packed_rows_give_each_row_its_own_logits_and_gradient(student, start) -> None:
    """Completions packed in one row, several continuing one prompt (read in the same pass,
    or read before, as a step's sampling reads it): the logits and the gradient into B are
    those of each row's own unpacked pass; also where the prompts share a start long enough
    to be read once (a chat template's system turn), whose gradient reaches B through every
    row."""
    model, tokenizer = student
    _, guard = lessons_and_guard(1)
    lora.set_b(model, {n: np.full_like(b, 0.01) for n, b in lora.get_b(model).items()})
    system = [3 + (7 * i) % 50 for i in range(start)]
    prompts = [system + chat_ids(tokenizer, g, generation=True) for g in guard[:3]]
    shared = common_start(prompts)
    assert shared >= start if start else shared == 0
    owners = [0, 0, 1, 1, 1, 2]
    ys = [[5, 6, 7], [8], [9, 10], [11, 12, 13, 14], [15], [16, 17]]

    def logits_and_grad(how: str):
        model.zero_grad(set_to_none=True)
        if how == "read before":
            read = read_prompts(model, prompts, tokenizer.pad_token_id)
            logits, counts = completion_logits(model, [], ys, 1, owners, read)
        elif how == "read once":
            logits, counts = completion_logits(model, prompts, ys, 1, owners)
        else:  # each row its own plain pass
            rows = [model(input_ids=torch.tensor([prompts[i] + y])).logits[0, len(prompts[i]):-1]
                    for i, y in zip(owners, ys, strict=True)]
            logits, counts = torch.cat(rows), [len(y) - 1 for y in ys]
        (logits.float() ** 2).mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return logits.detach(), counts, grads

    own, own_counts, own_grads = logits_and_grad("own")
    assert own_counts == [2, 0, 1, 3, 0, 1] and own_grads
    for how in ("read before", "read once"):
        packed, counts, grads = logits_and_grad(how)
        assert counts == own_counts
        assert torch.allclose(packed, own, atol=1e-4), how
        assert grads.keys() == own_grads.keys()
        for name, grad in grads.items():
            assert torch.allclose(grad, own_grads[name], atol=1e-6, rtol=1e-3), (how, name)


def test_prompts_that_start_alike_read_their_start_once_as_each_alone_reads_it(student) -> None:
    """A lesson's dream prompts (its session, then a question each, of different lengths):
    read as one common start and their own rests, each prompt's next-token logits, and the
    greedy answers and confidences decoded from there, are those of reading it alone."""
    model, tokenizer = student
    lessons, _ = lessons_and_guard(1)
    lora.set_b(model, {n: np.full_like(b, 0.02) for n, b in lora.get_b(model).items()})
    context = lessons[0].context
    questions = ["what is the colour of the sky ?", "who ?", "tell me more about it ."]
    prompts = [chat_ids(tokenizer, [*context, {"role": "user", "content": q}],
                        generation=True) for q in questions]
    shared = len(chat_ids(tokenizer, context, generation=False))
    assert all(p[:shared] == prompts[0][:shared] for p in prompts)
    assert common_start(prompts) >= shared >= SHARED_START_MIN
    with torch.inference_mode():
        read = read_prompts(model, prompts, tokenizer.pad_token_id)
        alone = [model(input_ids=torch.tensor([p])).logits[0, -1] for p in prompts]
    # The common start first in every row (a left-padded read would start the shorter
    # prompts with padding), each row's padding after it.
    assert bool(read.mask[:, :shared].all())
    assert read.mask.sum(-1).tolist() == [len(p) for p in prompts]
    for row, logits in enumerate(alone):
        assert torch.allclose(read.logits[row, -1], logits, atol=1e-4), row
    stop = turn_end_ids(tokenizer, model)
    got = greedy_confidence(model, tokenizer, prompts, 8, stop)
    for prompt, confidence in zip(prompts, got, strict=True):
        (want,) = generate(model, tokenizer, [prompt], 1, 8, 0.0, stop)[1]
        assert confidence == pytest.approx(want, abs=1e-5)


def test_dreams_continue_the_held_session_cache_as_a_fresh_read_would(student) -> None:
    """Two lessons dreamt in one pass read after the consolidation's held caches of their
    sessions (`TeacherContexts.read_after`) instead of reading the sessions again: the same
    drafts from the same draws, the same dreams kept for each lesson, confidences within
    float rounding."""
    model, tokenizer = student
    lessons, _ = lessons_and_guard(3)
    lessons = lessons[1:]
    lora.set_b(model, {n: np.full_like(b, 0.002) for n, b in lora.get_b(model).items()})
    lora.hold_global(model)
    ids = {lesson.session_id: chat_ids(tokenizer, lesson.context, generation=False)
           for lesson in lessons}
    assert len({len(context) for context in ids.values()}) == 2  # one is held padded
    contexts = TeacherContexts.encode(model, ids)
    got = {}
    for how, held in (("fresh", None), ("held", contexts)):
        generator = torch.Generator().manual_seed(3)
        got[how] = dream(model, tokenizer, lessons, 8, 12, 0.0, None, generator, held)
    assert len(got["held"]) == len(lessons)
    for (fresh, fresh_rejected), (held, held_rejected), lesson in zip(
            got["fresh"], got["held"], lessons, strict=True):
        assert fresh_rejected == held_rejected == 8 - len(fresh)
        assert {d.session_id for d in held} <= {lesson.session_id}
        assert [d.prompt for d in held] == [d.prompt for d in fresh]
        assert [d.confidence for d in held] == pytest.approx([d.confidence for d in fresh],
                                                             abs=1e-5)
    assert sum(len(kept) for kept, _ in got["held"]) >= 2
    # A prompt that does not continue its session is read the plain way.
    session, context = next(iter(ids.items()))
    assert contexts.read_after(model, [session], [[*context[1:], 5]],
                               tokenizer.pad_token_id) is None
    assert contexts.read_after(model, [session], [context],
                               tokenizer.pad_token_id) is None  # nothing after it


def test_a_short_common_start_is_read_with_each_prompt() -> None:
    """Under SHARED_START_MIN tokens in common (the toy model's prompts share 3), or a single
    prompt, nothing is read apart; each prompt keeps a token of its own."""
    long = list(range(10, 10 + SHARED_START_MIN))
    assert common_start([[5], [5, 6]]) == 0
    assert common_start([[*long[:-1], 1], [*long[:-1], 2]]) == 0
    assert common_start([[*long, 1], [*long, 2, 3]]) == len(long)
    assert common_start([long, [*long, 2]]) == 0  # the first would keep nothing
    assert common_start([[*long, 7], [*long, 7]]) == len(long)
    assert common_start([[*long, 1]]) == 0


def test_one_token_samples_after_a_read_take_the_reads_logits(student) -> None:
    model, tokenizer = student
    _, guard = lessons_and_guard(1)
    prompts = [chat_ids(tokenizer, g, generation=True) for g in guard[:2]]
    read = read_prompts(model, prompts, tokenizer.pad_token_id)
    logits, counts = completion_logits(model, [], [[5], [6], [7]], 0, [1, 0, 1], read)
    assert counts == [1, 1, 1]
    assert torch.equal(logits, read.logits[:, -1][[1, 0, 1]])
    logits, counts = completion_logits(model, [], [[5], [6]], 1, [0, 1], read)
    assert counts == [0, 0] and logits.shape == (0, model.config.vocab_size)


def test_the_loss_is_the_reverse_kl_of_each_rows_own_logits(student) -> None:
    """Rows of different lengths, the lesson's and the guard's scored in one packed pass, give
    each row's per-token reverse KL as its own unpadded pass does."""
    model, tokenizer = student
    lessons, guard = lessons_and_guard(1)
    # B of 0.05: a KL far above the float32 noise between a packed and an unpadded pass
    lora.set_b(model, {n: np.full_like(b, 0.05) for n, b in lora.get_b(model).items()})
    contexts, batch = one_lesson_step(model, tokenizer, lessons[0])
    prompts = [chat_ids(tokenizer, g, generation=True) for g in guard[:3]]
    examples = [GuardExample(p, y) for p, y in zip(prompts, [[5], [6, 7, 8], [9, 10]],
                                                   strict=True)]
    cfg = DistillConfig(skip_first=1, guard_weight=0.5)
    (lesson_kl,), (guard_kl,) = backpropagate(model, tokenizer, contexts, batch,
                                              examples, None, cfg)

    @torch.no_grad()
    def row_kl(student_ids, teacher_ids, y):
        student_logits = model(input_ids=torch.tensor([student_ids + y])).logits[0]
        with lora.adapter_disabled(model):
            teacher_logits = model(input_ids=torch.tensor([teacher_ids + y])).logits[0]
        picked = slice(-len(y), -1)  # predicting y[1:]: skip_first=1
        return reverse_kl(student_logits[picked], teacher_logits[picked]).mean()

    context = contexts.ids[lessons[0].session_id]
    (prompt,) = batch.prompts
    expected = [row_kl(prompt.student, context + prompt.teacher_suffix, y)
                for y in batch.completions if len(y) > 1]
    assert lesson_kl == pytest.approx(float(torch.stack(expected).mean()), rel=1e-4)
    # The guard's first example has no token after the skipped one: it takes no part.
    expected = [row_kl(g.prompt, g.prompt, g.completion) for g in examples[1:]]
    assert guard_kl == pytest.approx(float(torch.stack(expected).mean()), rel=1e-4)


@pytest.mark.parametrize("skip_first", [0, 1])
def test_the_held_guard_reference_is_the_frozen_models_pass(student, monkeypatch,
                                                            skip_first) -> None:
    """Held once (`hold_references`) or read off the guard's own sampling
    (`with_references`), each example's reference is the frozen model's pass over it."""
    model, tokenizer = student
    _, guard = lessons_and_guard(1)
    rng = np.random.default_rng(0)  # a B whose answers end at different lengths
    lora.set_b(model, {n: (0.1 * rng.standard_normal(b.shape)).astype(np.float32)
                       for n, b in lora.get_b(model).items()})
    lora.hold_global(model)
    cfg = DistillConfig(guard_prompts_per_step=2, skip_first=skip_first)
    stop = turn_end_ids(tokenizer)
    examples, none = guard_examples(model, tokenizer, guard, cfg, random.Random(0), stop)
    again, sampled = guard_examples(model, tokenizer, guard, cfg, random.Random(0), stop,
                                    with_references=True)
    assert none is None and sampled is not None
    held = hold_references(model, examples, cfg)
    assert [r.shape[0] for r in held] == [max(len(g.completion) - skip_first, 0)
                                          for g in examples]
    for example, reference in zip(examples, held, strict=True):  # each alone, unpadded
        assert torch.allclose(reference, guard_reference(model, [example], cfg),
                              atol=1e-5)
    # The sampled references: each example's own, whatever the draws gave (rows of
    # different lengths left the decoding batch at different steps).
    assert len({len(g.completion) for g in again}) > 1
    for example, reference in zip(again, sampled, strict=True):
        assert torch.allclose(reference, guard_reference(model, [example], cfg),
                              atol=1e-4)
    # Over the memory budget nothing is held, and each step pays the frozen pass instead.
    monkeypatch.setattr("fleetmind.client.guard.GUARD_REFERENCE_MB", 0)
    assert hold_references(model, examples, cfg) is None
    assert guard_examples(model, tokenizer, guard, cfg, random.Random(0), stop,
                          with_references=True)[1] is None


def test_a_guard_set_from_an_earlier_frozen_model_is_scored_against_the_current_one(
        toy_model_dir) -> None:
    """The demo's FedIT arm samples its guard set once and keeps it for every round: the
    reference must be the frozen model of the round, where the student starts, not the one
    the set was sampled from."""
    model, tokenizer = load_model(toy_model_dir)
    peft_model = lora.attach_lora(model, seed=3, rank=4)
    lessons, guard = lessons_and_guard(1)
    cfg = DistillConfig(steps=1, dream_ratio=0, replay_ratio=0)
    guard_set, _ = guard_examples(peft_model, tokenizer, guard, cfg, random.Random(0),
                                  turn_end_ids(tokenizer))
    lora.set_b(peft_model, {n: np.full_like(b, 0.05) for n, b in lora.get_b(peft_model).items()})
    result = distill.consolidate(peft_model, tokenizer, lessons, guard, cfg, progress=False,
                                 guard_set=guard_set)
    # At the first step the student is the frozen model: nothing to pull back yet.
    assert result.stats.guard_kl[0] < 1e-6


def test_the_guard_every_nth_step_runs_at_n_times_the_weight(student) -> None:
    model, tokenizer = student
    lessons, guard = lessons_and_guard(1)
    lora.set_b(model, {n: np.full_like(b, 0.01) for n, b in lora.get_b(model).items()})
    contexts, batch = one_lesson_step(model, tokenizer, lessons[0])
    examples = guard_examples(model, tokenizer, guard, DistillConfig(),
                              random.Random(0), turn_end_ids(tokenizer))[0][:4]
    lora.hold_global(model)
    lora.set_b(model, {n: np.full_like(b, 0.02) for n, b in lora.get_b(model).items()})

    def grads(cfg):
        model.zero_grad(set_to_none=True)
        backpropagate(model, tokenizer, contexts, batch, examples, None, cfg)
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    every_third = grads(DistillConfig(guard_weight=2.0, guard_every=3))
    tripled = grads(DistillConfig(guard_weight=6.0, guard_every=1))
    unguarded = grads(DistillConfig(guard_weight=0.0))
    for name, grad in every_third.items():
        assert torch.allclose(grad, tripled[name], atol=1e-7, rtol=1e-4), name
    assert any(not torch.allclose(g, unguarded[n]) for n, g in every_third.items())
    result = distill.consolidate(model, tokenizer, lessons, guard,
                                 DistillConfig(steps=5, guard_every=2, dream_ratio=0,
                                               replay_ratio=0), progress=False)
    assert len(result.stats.kl) == 5 and len(result.stats.guard_kl) == 3  # steps 0, 2, 4


def test_consolidation_moves_only_b_and_leaves_the_teacher_unchanged(student) -> None:
    model, tokenizer = student
    lessons, guard = lessons_and_guard(2)
    probe = chat_ids(tokenizer, lessons[0].probes[-1], generation=True)
    with torch.no_grad(), lora.adapter_disabled(model):
        teacher_before = model(input_ids=torch.tensor([probe])).logits.clone()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" not in n}
    cfg = DistillConfig(steps=3, dreams_per_lesson=2, dream_confidence=0.0)
    result = distill.consolidate(model, tokenizer, lessons, guard, cfg, progress=False)
    with torch.no_grad(), lora.adapter_disabled(model):
        teacher_after = model(input_ids=torch.tensor([probe])).logits
    assert torch.equal(teacher_before, teacher_after)
    for name, parameter in model.named_parameters():
        if name in frozen:
            assert torch.equal(parameter, frozen[name]), name
    assert any(np.abs(d).max() > 0 for d in result.delta.values())
    assert result.sessions == [lesson.session_id for lesson in lessons]
    assert result.stats.steps == 3 and len(result.stats.loss) == 3


def test_consolidation_is_deterministic_under_a_seed(toy_model_dir) -> None:
    lessons, guard = lessons_and_guard(1)
    deltas = []
    for _ in range(2):
        model, tokenizer = load_model(toy_model_dir)
        peft_model = lora.attach_lora(model, seed=3, rank=4)
        cfg = DistillConfig(steps=2, dreams_per_lesson=2, seed=5)
        deltas.append(distill.consolidate(peft_model, tokenizer, lessons, guard, cfg,
                                          progress=False).delta)
    assert all(np.array_equal(deltas[0][k], deltas[1][k]) for k in deltas[0])


def test_the_frozen_global_model_is_the_adapter_when_consolidation_began(toy_model_dir
                                                                           ) -> None:
    model, tokenizer = load_model(toy_model_dir)
    peft_model = lora.attach_lora(model, seed=2)
    ids = torch.tensor([chat_ids(tokenizer, [{"role": "user", "content":
                                              "what is the color of moukrain ?"}],
                                 generation=True)])
    shapes = lora.get_b(peft_model)
    lora.set_b(peft_model, {n: np.full_like(b, 0.02) for n, b in shapes.items()})
    lora.hold_global(peft_model)  # a later round: the global B is no longer zero
    with torch.no_grad():
        global_logits = peft_model(input_ids=ids).logits.clone()
        with lora.adapter_disabled(peft_model):
            base_logits = peft_model(input_ids=ids).logits.clone()
    assert not torch.allclose(global_logits, base_logits)
    lora.set_b(peft_model, {n: np.full_like(b, 0.05) for n, b in shapes.items()})
    student_loss = peft_model(input_ids=ids).logits.square().mean()
    with torch.no_grad(), lora.frozen_global(peft_model):
        assert torch.allclose(peft_model(input_ids=ids).logits, global_logits)
    student_loss.backward()  # the student's graph outlived the teacher's forward
    assert all(np.allclose(b, 0.05) for b in lora.get_b(peft_model).values())
    assert all(p.grad is not None for p in lora.trainable_parameters(peft_model))


def test_sgd_keeps_a_session_delta_small_where_adam_spreads_it(toy_model_dir) -> None:
    lessons, guard = lessons_and_guard(1)
    norms = {}
    for optimizer, lr in (("adam", 5e-3), ("sgd", 1.0)):
        model, tokenizer = load_model(toy_model_dir)
        peft_model = lora.attach_lora(model, seed=3)
        cfg = DistillConfig(steps=3, lr=lr, optimizer=optimizer, dreams_per_lesson=2)
        delta = distill.consolidate(peft_model, tokenizer, lessons, guard, cfg,
                                    progress=False).delta
        norms[optimizer] = float(np.sqrt(sum(np.square(d).sum() for d in delta.values())))
    # Adam moves every coordinate by about lr per step: 3 x 5e-3 x sqrt(18432) = 2.0.
    assert norms["adam"] > 1.0
    assert 0 < norms["sgd"] < norms["adam"] / 2


def test_the_sft_baseline_learns_the_transcript_text(student) -> None:
    model, tokenizer = student
    lessons, _ = lessons_and_guard(2)
    examples = distill.transcript_examples(tokenizer, lessons)
    assert [p + t for p, t in examples] == [chat_ids(tokenizer, lesson.context,
                                                     generation=False)
                                            for lesson in lessons]
    result = distill.supervise(model, tokenizer, examples,
                               DistillConfig(steps=6, lr=1e-2, method="sft_transcript"))
    assert result.stats.steps == 6
    assert result.stats.loss[-1] < result.stats.loss[0]
    assert any(np.abs(d).max() > 0 for d in result.delta.values())


def test_the_sft_step_is_the_mean_over_every_drawn_row(student) -> None:
    """Rows drawn more than once are computed once and weighted by their count: the step is
    still the masked mean over all drawn rows, duplicates included, computed here row by row."""
    import random

    import torch.nn.functional as F

    model, tokenizer = student
    lessons, _ = lessons_and_guard(3)
    examples = distill.transcript_examples(tokenizer, lessons)
    assert len({len(p) + len(t) for p, t in examples}) > 1  # lengths differ: weights matter
    cfg = DistillConfig(steps=1, lr=0.5, optimizer="sgd", method="sft_transcript",
                        prompts_per_step=3, samples_per_prompt=2, seed=4)
    start = lora.get_b(model)
    drawn = random.Random(cfg.seed).choices(examples, k=6)
    assert len({id(pair) for pair in drawn}) < len(drawn)  # some row drawn twice
    ids = pad_right([p + t for p, t in drawn], tokenizer.pad_token_id)
    mask = completion_mask([len(p) for p, _ in drawn], [len(t) for _, t in drawn],
                           ids.shape[1], 0)[:, :-1]
    logits = model(input_ids=ids).logits[:, :-1]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                           reduction="none").view_as(mask)
    ((loss * mask).sum() / mask.sum()).backward()
    layers = lora.lora_layers(model)
    expected = {name: -cfg.lr * layers[name].lora_B["default"].weight.grad.numpy()
                for name in start}
    model.zero_grad(set_to_none=True)
    result = distill.supervise(model, tokenizer, examples, cfg)
    assert result.stats.tokens == int(mask.sum())
    for name, delta in result.delta.items():
        assert np.allclose(delta, expected[name], atol=1e-6 + 1e-4 * np.abs(expected[name]).max())
    assert max(float(np.abs(d).max()) for d in result.delta.values()) > 1e-5


@pytest.mark.parametrize("bad", [{"steps": 0}, {"guard_every": 0}, {"lr": 0},
                                 {"probe_ratio": -1}, {"dream_confidence": 2},
                                 {"optimizer": "lion"}, {"method": "dpo"}, {"top_k": -2},
                                 {"dtype": "int8"}, {"device": "tpu"}])
def test_bad_config_is_refused(bad) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        DistillConfig(**bad)


def test_device_and_dtype_are_settings_with_short_names() -> None:
    cfg = DistillConfig(dtype="bf16", device="cuda:1")
    assert (cfg.dtype, cfg.device) == ("bfloat16", "cuda:1")
    assert DistillConfig().dtype == "float32" and DistillConfig().device == "cpu"


def test_top_k_is_chosen_from_the_vocabulary_when_left_to_auto() -> None:
    auto = DistillConfig().top_k
    assert resolve_top_k(auto, 888) == 0  # the toy model: the whole vocabulary
    assert resolve_top_k(auto, FULL_KL_MAX_VOCAB) == 0
    assert resolve_top_k(auto, 151_936) == AUTO_TOP_K_TOKENS
    assert resolve_top_k(0, 151_936) == 0 and resolve_top_k(20, 888) == 20


def test_turn_ends_come_from_the_template_and_the_generation_config(toy_model) -> None:
    model, tokenizer = toy_model
    assert template_turn_end(tokenizer) == tokenizer.eos_token_id
    assert turn_end_ids(tokenizer, model) == {tokenizer.eos_token_id}

    class Listed:  # a model whose generation config lists several ends (Llama 3, Gemma)
        generation_config = type("G", (), {"eos_token_id": [5, tokenizer.eos_token_id]})()

    assert turn_end_ids(tokenizer, Listed()) == {5, tokenizer.eos_token_id}


def test_the_toy_models_mlp_targets_are_the_llama_familys(toy_model_dir) -> None:
    model, _ = load_model(toy_model_dir)
    assert lora.target_names(model) == list(lora.MLP_TARGETS)
    assert lora.target_names(model, "peft") == ["q_proj", "v_proj"]
    modules = lora.matched_modules(model, lora.target_names(model))
    assert len(modules) == 6 and not lora.fan_in_fan_out(modules)
    with pytest.raises(ValueError, match="match no linear layer"):
        lora.attach_lora(model, seed=0, targets=["no_such_proj"])
    with pytest.raises(ValueError, match="must be one of"):
        lora.target_names(model, "attention")
