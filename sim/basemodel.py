"""The toy base model: a small Hugging Face Llama trained here, on the world's grammar, until
it answers from its context. Nothing is downloaded; the result is an ordinary HF folder.

Why this recipe (measured, see docs/toy-world.md):
- one token per word, so a name is one token and matching it is one comparison;
- every name is drawn at random for every training session, so every embedding trains,
  no pairing has a fixed meaning, and closed-book accuracy stays at chance;
- a curriculum on the number of facts per session, many questions per session, a full
  LM loss plus extra weight on the assistant's answers;
- background knowledge: fixed facts about names no world uses, recalled closed-book, and
  those names also read in context, so that recall and reading share a name's features and
  an adapter can key a new fact on its name, not only its attribute (docs/learning-scale.md,
  "A base model that recalls"); questions in both probe forms, so both stay readable.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

from fleetmind.sim import world as W

SPECIAL = {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"}
ROLES = ("system", "user", "assistant")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<{{ message['role'] }}> "
    "{{ message['content'] }} {{ eos_token }} {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)
BUILDER_VERSION = 2
HELDOUT_SEED = 9_999


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the toy model; its hash names the cache entry."""

    hidden: int = 128
    layers: int = 2
    heads: int = 4
    intermediate: int = 512
    steps: int = 2500
    batch: int = 32
    lr: float = 3e-3
    warmup: int = 100
    curriculum: float = 0.4
    max_facts: int = 6
    answer_weight: float = 3.0
    same_name: float = 0.2
    canary_rate: float = 0.1
    cold_rate: float = 0.1
    background_rate: float = 0.5  # sessions opening with closed-book background questions
    background_in_context: float = 0.5  # sessions whose names are all background names
    background_attributes: int = 2  # fixed facts per background name
    # Questions asked in W.OTHER_FORMS rather than strict: 0.1 keeps both forms read in
    # context at 0.9+; 0.3 halved what an adapter stores (docs/toy-world.md).
    other_form_rate: float = 0.1
    seed: int = 0
    threads: int = 2
    eval_tasks: int = 200

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} is not divisible by heads={self.heads}")
        if self.steps < 1 or self.batch < 1 or self.lr <= 0:
            raise ValueError("steps, batch and lr must be positive")
        if not 1 <= self.max_facts <= 8:
            raise ValueError(f"max_facts={self.max_facts}: use 1 to 8")

    def digest(self) -> str:
        """The recipe's hash; the thread count only orders float sums, so it is left out."""
        recipe = {k: v for k, v in asdict(self).items() if k != "threads"}
        payload = {"config": recipe, "builder": BUILDER_VERSION,
                   "lexicon": hashlib.sha256(" ".join(W.lexicon().words()).encode()).hexdigest()}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def vocabulary() -> list[str]:
    return ([SPECIAL["pad"], SPECIAL["unk"], SPECIAL["bos"], SPECIAL["eos"]]
            + [f"<{role}>" for role in ROLES] + W.lexicon().words())


def build_tokenizer() -> Any:
    """A word-level tokenizer over the lexicon, as a standard fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL["unk"]))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=SPECIAL["bos"], eos_token=SPECIAL["eos"],
        pad_token=SPECIAL["pad"], unk_token=SPECIAL["unk"],
        additional_special_tokens=[f"<{role}>" for role in ROLES])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def render(messages: list[dict[str, str]], vocab: dict[str, int], answer_weight: float
           ) -> tuple[list[int], list[float]]:
    """Token ids exactly as CHAT_TEMPLATE renders them (a test checks), and the loss weight of
    predicting each token: `answer_weight` on the assistant's words, 1 elsewhere."""
    words, weights = [SPECIAL["bos"]], [0.0]
    for message in messages:
        content = [*message["content"].split(), SPECIAL["eos"]]
        weight = answer_weight if message["role"] == "assistant" else 1.0
        words += [f"<{message['role']}>", *content]
        weights += [1.0] + [weight] * len(content)
    return [vocab[w] for w in words], weights


def training_session(rng: random.Random, facts: int, cfg: TrainConfig) -> list[dict[str, str]]:
    """Random facts stated, every one asked (some twice), in random order; sometimes a cold
    question first, and sometimes background questions before everything."""
    lex = W.lexicon()
    pool = lex.background_names if rng.random() < cfg.background_in_context else lex.names
    stated: list[W.Fact] = []
    for name in rng.sample(pool, facts):
        if stated and rng.random() < cfg.same_name:
            name = rng.choice(stated).name
        taken = {f.attribute for f in stated if f.name == name}
        attribute = rng.choice([a for a in W.ATTRIBUTES if a not in taken])
        stated.append(W.random_fact(rng, name=name, attribute=attribute))
    asked = rng.sample(stated, len(stated)) + rng.sample(stated, rng.randint(0, len(stated)))
    canary = W.random_canary(rng) if rng.random() < cfg.canary_rate else None
    messages = W.session_messages(stated, [], canary=canary) + _questions(rng, asked, cfg)
    if rng.random() < cfg.cold_rate:
        # A question before any context, answered with a random value: the model learns the
        # answer's shape for closed-book questions, and that their values are chance.
        messages = _questions(rng, [W.random_fact(rng, name=rng.choice(pool))], cfg) + messages
    if rng.random() < cfg.background_rate:
        known = rng.sample(background_facts(cfg.background_attributes), rng.randint(1, 3))
        messages = _questions(rng, known, cfg) + messages
    return messages


def _questions(rng: random.Random, asked: list[W.Fact], cfg: TrainConfig
               ) -> list[dict[str, str]]:
    """Each fact asked (strict, or another probe form at `other_form_rate`) and answered."""
    forms = [rng.choice(W.OTHER_FORMS) if rng.random() < cfg.other_form_rate else "strict"
             for _ in asked]
    return W.chat(*W.question_turns(asked, forms))


@cache
def background_facts(attributes: int) -> tuple[W.Fact, ...]:
    """The toy model's fixed knowledge: `attributes` facts about each background name."""
    rng = random.Random("fleetmind-background-facts")
    return tuple(W.random_fact(rng, name=name, attribute=attribute)
                 for name in W.lexicon().background_names
                 for attribute in rng.sample(W.ATTRIBUTES, attributes))


def make_batch(rng: random.Random, max_facts: int, cfg: TrainConfig, vocab: dict[str, int]
               ) -> tuple[Any, Any]:
    import torch

    rows = [render(training_session(rng, rng.randint(1, max_facts), cfg), vocab,
                   cfg.answer_weight) for _ in range(cfg.batch)]
    length = max(len(ids) for ids, _ in rows)
    ids = torch.full((cfg.batch, length), vocab[SPECIAL["pad"]], dtype=torch.long)
    weights = torch.zeros((cfg.batch, length))
    for row, (tokens, token_weights) in enumerate(rows):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        weights[row, : len(tokens)] = torch.tensor(token_weights)
    return ids, weights  # (B, T) each


def new_model(cfg: TrainConfig, tokenizer: Any) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def train(cfg: TrainConfig, tokenizer: Any, progress: bool = True) -> Any:
    """nanoGPT-style loop: batches from the grammar, weighted next-token loss, AdamW, cosine."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = random.Random(f"toy-train-{cfg.seed}")
    vocab = tokenizer.get_vocab()
    model = new_model(cfg, tokenizer)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98),
                                  weight_decay=0.01)

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        done = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done)))

    bar = _progress(progress)
    task = bar.add_task("toy model", total=cfg.steps, loss=float("nan"), tps=0.0)
    started, tokens = time.perf_counter(), 0
    with bar:
        for step in range(cfg.steps):
            ramp = min(1.0, step / max(1, cfg.curriculum * cfg.steps))
            max_facts = 1 + round(ramp * (cfg.max_facts - 1))
            ids, weights = make_batch(rng, max_facts, cfg, vocab)
            logits = model(input_ids=ids).logits[:, :-1]  # (B, T-1, V)
            target, weight = ids[:, 1:], weights[:, 1:]
            token_loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                                         reduction="none").view_as(target)
            loss = (token_loss * weight).sum() / weight.sum()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            tokens += ids.numel()
            bar.update(task, advance=1, loss=loss.item(),
                       tps=tokens / (time.perf_counter() - started))
    model.eval()
    return model


def answer_correct(model: Any, tokenizer: Any, prompts: list[list[dict[str, str]]],
                   answers: list[str], batch: int = 64) -> list[bool]:
    """Whether greedy decoding would produce exactly `answer` after each prompt, checked in one
    teacher-forced pass (greedy yields the answer iff every answer token is the argmax)."""
    import torch

    results: list[bool] = []
    pad = tokenizer.pad_token_id
    for start in range(0, len(prompts), batch):
        rows = []
        for messages, expected in zip(prompts[start:start + batch],
                                      answers[start:start + batch], strict=True):
            text = tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True)
            prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            answer_ids = tokenizer(expected, add_special_tokens=False)["input_ids"]
            rows.append((prompt_ids, answer_ids))
        length = max(len(p) + len(a) for p, a in rows)
        ids = torch.full((len(rows), length), pad, dtype=torch.long)
        for row, (p, a) in enumerate(rows):
            ids[row, : len(p) + len(a)] = torch.tensor(p + a)
        with torch.no_grad():
            predicted = model(input_ids=ids).logits.argmax(-1)  # (B, T)
        for row, (p, a) in enumerate(rows):
            guess = predicted[row, len(p) - 1 : len(p) + len(a) - 1].tolist()
            results.append(guess == a)
    return results


def fact_accuracy(model: Any, tokenizer: Any, facts: Sequence[W.Fact],
                  prompt: Callable[[W.Fact], list[dict[str, str]]] = W.closed_book_prompt
                  ) -> float:
    """Share of `facts` answered exactly after `prompt(fact)`: closed-book by default; pass
    `lambda f: W.context_prompt([f], f)` for the teacher's in-context accuracy."""
    if not facts:
        return 0.0
    return _mean(answer_correct(model, tokenizer, [prompt(f) for f in facts],
                                [W.answer(f) for f in facts]))


def measure(model: Any, tokenizer: Any, world: W.World) -> dict[str, Any]:
    """In-context accuracy on the world's general tasks by number of facts, closed-book accuracy
    on its facts (which the model was never told), and chance."""
    tasks: dict[str, tuple[list[list[dict[str, str]]], list[str]]] = {}
    for task in world.general:
        stated = [W.Fact(**fact) for fact in task["facts"]]
        asked = W.Fact(**task["asked"])
        prompts, answers = tasks.setdefault(str(len(stated)), ([], []))
        prompts.append(W.context_prompt(stated, asked))
        answers.append(W.answer(asked))
    by_facts = {facts: _mean(answer_correct(model, tokenizer, prompts, answers))
                for facts, (prompts, answers) in sorted(tasks.items())}
    small = [by_facts[k] for k in ("1", "2") if k in by_facts]
    return {
        "incontext_accuracy": sum(small) / len(small),
        "incontext_by_facts": by_facts,
        "closed_book_accuracy": fact_accuracy(model, tokenizer,
                                              [fact for _, fact in world.facts()]),
        "chance_accuracy": 1 / W.VALUES_PER_ATTRIBUTE,
    }


def context_accuracy(model: Any, tokenizer: Any, tasks: Sequence[tuple[list[W.Fact], W.Fact]],
                     form: str = "strict") -> float:
    """Share of in-context tasks (facts stated, one of them asked in `form`, a name in
    W.QUESTION_FORMS) answered exactly."""
    return _mean(answer_correct(model, tokenizer,
                                [W.context_prompt(stated, asked, form) for stated, asked in tasks],
                                [W.answer(asked) for _, asked in tasks]))


def measure_forms(model: Any, tokenizer: Any, world: W.World,
                  forms: Sequence[str] = tuple(W.QUESTION_FORMS)) -> dict[str, dict[str, float]]:
    """In-context accuracy on the world's general tasks per question form, by number of facts:
    whether the model reads a question in a form that no world's session uses. The strict
    form's row is `measure`'s `incontext_by_facts`."""
    sizes: dict[str, list[tuple[list[W.Fact], W.Fact]]] = {}
    for task in world.general:
        stated = [W.Fact(**fact) for fact in task["facts"]]
        sizes.setdefault(str(len(stated)), []).append((stated, W.Fact(**task["asked"])))
    return {form: {size: context_accuracy(model, tokenizer, tasks, form)
                   for size, tasks in sorted(sizes.items())} for form in forms}


def heldout_world(tasks_per_size: int = 200) -> W.World:
    """Entities and pairings the builder never used (it draws every pairing afresh)."""
    return W.make_world(W.WorldSpec(seed=HELDOUT_SEED, sites=8, facts_per_site=25,
                                    general_tasks=tasks_per_size * W.GENERAL_MAX_FACTS))


def build_toy(out: Path, cfg: TrainConfig | None = None, progress: bool = True) -> dict[str, Any]:
    """Trains, saves (fp16 safetensors + tokenizer), re-loads what was saved and measures it."""
    import torch

    from fleetmind.client.model import load_model

    cfg = cfg or TrainConfig()
    started = time.perf_counter()
    tokenizer = build_tokenizer()
    model = train(cfg, tokenizer, progress=progress)
    build_seconds = time.perf_counter() - started
    parameters = sum(p.numel() for p in model.parameters())
    staging = out.with_name(out.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    saved, saved_tokenizer = load_model(staging)
    heldout = heldout_world(cfg.eval_tasks)
    report = {**measure(saved, saved_tokenizer, heldout),
              "incontext_by_form": measure_forms(saved, saved_tokenizer, heldout, W.PROBE_FORMS),
              "background_closed_book_accuracy": fact_accuracy(
                  saved, saved_tokenizer, background_facts(cfg.background_attributes)),
              "build_seconds": round(build_seconds, 1), "parameters": parameters,
              "config": asdict(cfg), "config_digest": cfg.digest(), "threads": cfg.threads}
    (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if out.exists():
        _remove_tree(out)
    staging.rename(out)
    return report


def _progress(enabled: bool) -> Any:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}"),
                    TextColumn("loss {task.fields[loss]:.3f}"),
                    TextColumn("{task.fields[tps]:.0f} tok/s"), TimeRemainingColumn(),
                    disable=not enabled)


def _mean(values: list[bool]) -> float:
    return sum(values) / len(values) if values else 0.0


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path)


COMMITTED_MODEL = Path(__file__).resolve().parent / "toy_model"


def cache_root() -> Path:
    import os

    return Path(os.environ.get("FLEETMIND_CACHE", Path.home() / ".cache" / "fleetmind"))


def toy_model_path(build: bool = True) -> Path:
    """The toy base model for the default recipe: the committed copy when it matches the
    recipe's hash, else this machine's cache, built there once when `build` allows."""
    digest = TrainConfig().digest()
    for folder in (COMMITTED_MODEL, cache_root() / f"toy-{digest}"):
        report = folder / "report.json"
        if report.is_file() and json.loads(report.read_text()).get("config_digest") == digest:
            return folder
    target = cache_root() / f"toy-{digest}"
    if not build:
        raise FileNotFoundError(f"no toy model for recipe {digest} (committed or cached): run "
                                f"`fleetmind model build-toy --out {target}`")
    build_toy(target)
    return target
