"""`fleetmind model build-random`: random-initialised models in real shapes, for cost only.

The toy model (0.6M parameters, 888 words) says nothing of what consolidation costs at a real
site, whose model has 0.1-8B parameters and a 32k-256k-token vocabulary; real weights cannot
be fetched (nothing is downloaded, ever). So this builds a model folder with a real model's
shape and random weights: its configuration written by hand below (`SHAPES`, each with its
source), a byte-level BPE tokenizer trained here, with `tokenizers`, to that vocabulary size
on a corpus made here (`corpus`), and the family's chat template and turn ends. The folder
loads with `AutoModelForCausalLM` / `AutoTokenizer` like any other, offline. Its answers are
noise: use it to measure time and memory (`fleetmind bench consolidate --model DIR`), never
quality.

What is real and what is not:
- the model's configuration is the public one, field by field, except the dtype the weights
  are stored in (bfloat16, as the published checkpoints; fleetmind loads them in the dtype a
  site asks for) and, in tests, what `layers` / `vocab_size` scale down;
- the tokenizer has the real vocabulary size and the real ids of the chat's special tokens,
  but its merges are learnt from this corpus (the toy world's text and made-up words), so a
  text's token count is near, not equal to, the real tokenizer's; only the special tokens the
  chat needs are added (SmolLM2 and Qwen2.5 list more);
- Qwen2.5's embedding has 151,936 rows, more than its tokenizer's ids (151,646 here, 151,665
  in the published one), as published: the extra rows are never produced by the tokenizer.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# ChatML as SmolLM2-Instruct's template writes it: a default system turn when the chat has
# none, then <|im_start|>role\ncontent<|im_end|>\n per message.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{ '<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# ChatML as Qwen2.5's template writes it for a chat without tools: its default system turn
# when the chat opens with no system message.
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a "
    "helpful assistant.<|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")
CHATML_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


@dataclass(frozen=True)
class Shape:
    """A real model's shape: its Hugging Face configuration fields, its tokenizer's size and
    special tokens, its chat template and generation config (the instruct model's, whose
    template the chat uses)."""

    name: str
    source: str
    config: dict[str, Any]
    tokenizer_size: int  # ids the tokenizer produces: BPE entries plus special tokens
    specials_first: bool  # special tokens at ids 0.. (SmolLM2), else right after the BPE's
    chat_template: str
    # Roles of the special tokens: tokenizer attribute -> token, generation config field ->
    # token or tokens (resolved to ids once the tokenizer exists).
    tokenizer_roles: dict[str, str] = field(default_factory=dict)
    generation: dict[str, str | tuple[str, ...]] = field(default_factory=dict)


SHAPES = {
    "smollm2-135m": Shape(
        name="smollm2-135m",
        source="HuggingFaceTB/SmolLM2-135M(-Instruct) config.json, generation_config.json, "
               "tokenizer_config.json, as published on the Hugging Face Hub",
        config={"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
                "hidden_act": "silu", "vocab_size": 49152, "max_position_embeddings": 8192,
                "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
                "initializer_range": 0.041666666666666664,
                "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": True},
        tokenizer_size=49152, specials_first=True, chat_template=SMOLLM2_TEMPLATE,
        tokenizer_roles={"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                         "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>"},
        generation={"bos_token_id": "<|im_start|>", "eos_token_id": "<|im_end|>",
                    "pad_token_id": "<|im_end|>"}),
    "qwen2.5-0.5b": Shape(
        name="qwen2.5-0.5b",
        source="Qwen/Qwen2.5-0.5B(-Instruct) config.json, generation_config.json, "
               "tokenizer_config.json, as published on the Hugging Face Hub",
        config={"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                "num_attention_heads": 14, "num_key_value_heads": 2, "hidden_act": "silu",
                "vocab_size": 151936, "max_position_embeddings": 32768,
                "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "initializer_range": 0.02,
                "max_window_layers": 24, "use_sliding_window": False, "sliding_window": None,
                "tie_word_embeddings": True},
        tokenizer_size=151643 + len(CHATML_SPECIALS), specials_first=False,
        chat_template=QWEN25_TEMPLATE,
        tokenizer_roles={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        generation={"bos_token_id": "<|endoftext|>",
                    "eos_token_id": ("<|im_end|>", "<|endoftext|>"),
                    "pad_token_id": "<|endoftext|>"}),
}


def shape_config(shape: Shape, layers: int | None = None,
                 vocab_size: int | None = None) -> dict[str, Any]:
    """The configuration's fields, `layers` and `vocab_size` (tests) scaled down."""
    config = dict(shape.config)
    if layers is not None:
        config["num_hidden_layers"] = layers
        if "max_window_layers" in config:
            config["max_window_layers"] = layers
    if vocab_size is not None:
        config["vocab_size"] = vocab_size
    return config


def corpus(words: int, seed: int = 0) -> Iterator[str]:
    """The text the tokenizer learns from, made here: the toy world's sessions and tasks (so
    the benchmark's sessions tokenize as words, not letters), then lines of made-up words,
    `words` distinct ones (letters and some digits, 2-12 long, Zipf-like frequencies), enough
    distinct pairs for BPE to reach a real vocabulary size."""
    from fleetmind.sim import world as W

    world = W.make_world(W.WorldSpec(seed=seed, sites=1))
    yield " ".join(W.lexicon().words())
    for site in world.sites:
        for session in site.sessions:
            for message in session["messages"]:
                yield message["content"]
    for task in [*world.general, *world.guard]:
        for message in W.task_prompt(task):
            yield message["content"]
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz" * 3 + "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    lexicon: set[str] = set()
    while len(lexicon) < words:
        lexicon.add("".join(rng.choice(alphabet) for _ in range(rng.randint(2, 12))))
    ordered = sorted(lexicon)
    rng.shuffle(ordered)
    # Every word at least 3 times (BPE merges pairs seen more than once), the first ones
    # more often, as a language's frequent words.
    weights = [1.0 / (rank + 10) for rank in range(len(ordered))]
    line: list[str] = []
    for draw in [*ordered * 3, *rng.choices(ordered, weights, k=3 * len(ordered))]:
        line.append(draw)
        if len(line) == 16:
            yield " ".join(line)
            line = []
    if line:
        yield " ".join(line)


def train_tokenizer(shape: Shape, size: int, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """A byte-level BPE tokenizer (as SmolLM2's and Qwen2.5's) with `size` ids, the chat's
    special tokens at the family's ids, as a transformers fast tokenizer; and what it took:
    the merges learnt and the vocabulary entries added to reach `size` if BPE fell short
    (unreachable entries, deterministic names: they only fill ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(CHATML_SPECIALS)
    bpe_size = size if shape.specials_first else size - len(specials)
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_size, special_tokens=specials if shape.specials_first else [],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    started = time.perf_counter()
    core.train_from_iterator(corpus(max(200, bpe_size), seed), trainer)
    learnt = core.get_vocab_size()
    padded = bpe_size - learnt
    if padded > 0:
        core = _padded(core, padded)
    if not shape.specials_first:
        core.add_special_tokens(specials)
    if core.get_vocab_size() != size:
        raise RuntimeError(f"the tokenizer has {core.get_vocab_size()} ids, not {size}")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, **shape.tokenizer_roles)
    tokenizer.chat_template = shape.chat_template
    return tokenizer, {"size": size, "bpe_learnt": learnt, "padded": max(0, padded),
                       "seconds": round(time.perf_counter() - started, 1)}


def _padded(core: Any, count: int) -> Any:
    """`core` with `count` vocabulary entries added after its own, named <|fill_N|> (no merge
    makes them: they fill ids only)."""
    from tokenizers import Tokenizer

    state = json.loads(core.to_str())
    vocab = state["model"]["vocab"]
    start = len(vocab)
    for i in range(count):
        vocab[f"<|fill_{i}|>"] = start + i
    return Tokenizer.from_str(json.dumps(state))


def build_random(like: str, out: Path, layers: int | None = None, vocab_size: int | None = None,
                 seed: int = 0) -> dict[str, Any]:
    """Builds the `like` shape's model folder at `out` (safetensors, tokenizer, chat template,
    generation config, report.json) and returns the report. `layers` and `vocab_size` scale
    the shape down (tests); the tokenizer then has `vocab_size` ids."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    if like not in SHAPES:
        raise ValueError(f"like={like!r}: use one of {', '.join(SHAPES)}")
    shape = SHAPES[like]
    if layers is not None and layers < 1:
        raise ValueError(f"layers={layers} must be at least 1")
    if vocab_size is not None and vocab_size < 300:
        raise ValueError(f"vocab_size={vocab_size}: at least 300 (256 bytes, the special "
                         "tokens and some merges)")
    started = time.perf_counter()
    fields = shape_config(shape, layers, vocab_size)
    size = shape.tokenizer_size if vocab_size is None else vocab_size
    tokenizer, trained = train_tokenizer(shape, size, seed)

    def ids(tokens: str | tuple[str, ...]) -> int | list[int]:
        if isinstance(tokens, str):
            return int(tokenizer.convert_tokens_to_ids(tokens))
        return [int(tokenizer.convert_tokens_to_ids(t)) for t in tokens]

    generation = {key: ids(tokens) for key, tokens in shape.generation.items()}
    first_eos = generation["eos_token_id"]
    config = AutoConfig.for_model(
        **{k: v for k, v in fields.items() if k != "architectures"},
        bos_token_id=generation["bos_token_id"],
        eos_token_id=first_eos[0] if isinstance(first_eos, list) else first_eos,
        pad_token_id=generation["pad_token_id"])
    config.architectures = fields["architectures"]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    parameters = sum(p.numel() for p in model.parameters())
    staging = out.with_name(out.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    model.to(torch.bfloat16).save_pretrained(staging)
    del model
    tokenizer.save_pretrained(staging)
    GenerationConfig(**generation).save_pretrained(staging)
    report = {"like": like, "source": shape.source, "random_weights": True,
              "purpose": "cost measurement only: random weights, answers are noise",
              "overrides": {k: v for k, v in (("layers", layers), ("vocab_size", vocab_size))
                            if v is not None},
              "parameters": parameters, "tokenizer": trained, "seed": seed,
              "build_seconds": round(time.perf_counter() - started, 1)}
    (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return report


def register(sub: Any, positive_int: Any) -> None:
    """Adds `build-random` to the `model` group's subparsers `sub` (sim/cli.py calls it)."""
    build = sub.add_parser(
        "build-random", help="a random-initialised model in a real shape, for cost only",
        description="Write a model folder with a real model's configuration and random "
                    "weights, a byte-level BPE tokenizer trained here to its vocabulary size "
                    "and its family's chat template and turn ends (no download). For cost "
                    "measurement only (fleetmind bench consolidate --model DIR): its answers "
                    "are noise.")
    build.add_argument("--like", choices=sorted(SHAPES), required=True)
    build.add_argument("--out", type=Path, required=True)
    build.add_argument("--layers", type=positive_int, default=None,
                       help="fewer layers than the shape's (tests)")
    build.add_argument("--vocab-size", type=positive_int, default=None,
                       help="a smaller vocabulary than the shape's, at least 300 (tests)")
    build.add_argument("--seed", type=int, default=0)
    build.set_defaults(run=_build_random)


def _build_random(args: Any) -> int:
    import argparse

    try:
        report = build_random(args.like, args.out, args.layers, args.vocab_size, args.seed)
    except ValueError as error:
        raise argparse.ArgumentError(None, str(error)) from None
    tokens = report["tokenizer"]
    print(f"{args.like}: {report['parameters']:,} parameters (random), tokenizer "
          f"{tokens['size']:,} ids ({tokens['bpe_learnt']:,} learnt by BPE, "
          f"{tokens['padded']:,} padded), built in {report['build_seconds']} s")
    print(f"model written to {args.out} (for cost measurement only)")
    return 0
