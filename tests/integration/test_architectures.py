"""Six model families, each built here with random weights and a BPE tokenizer trained here
(no download), go the whole way: a session is ingested, three sites consolidate, a secure
round over loopback gRPC merges their updates, each site checks the version's base-model
hash and activates it, and the published folder loads in vanilla
`peft.PeftModel.from_pretrained` with the same logits as fleetmind's own loading, its
adapter config holding what vLLM's LoRA loader reads.

Llama (Llama-3 template, turn ends from generation_config), Qwen2 (ChatML), Gemma
(<start_of_turn> ... <end_of_turn>), Phi-3 (<|user|> ... <|end|>), GPT-2 (ChatML on Conv1D
layers: fan_in_fan_out) and GPT-NeoX (OpenAssistant's <|prompter|> ... <|endoftext|>).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from support.concurrent import at_once, each_returned

from fleetmind.aggregation.manifest import Manifest, VersionError
from fleetmind.client import lora
from fleetmind.client.adapter_spec import adapter_spec
from fleetmind.client.agent import RoundResult, SiteUpdate, participate
from fleetmind.client.consolidate import consolidate_sessions
from fleetmind.client.distill_config import DistillConfig
from fleetmind.client.model import base_model_hash, check_base_model, load_model
from fleetmind.client.outbox import Outbox
from fleetmind.client.store import SessionStore
from fleetmind.client.tokens import chat_ids, turn_end_ids
from fleetmind.client.versions import activate, download_latest
from fleetmind.server.config import CohortPolicy, PrivacyPolicy, ServerConfig
from fleetmind.server.service import serve
from fleetmind.server.versions import AdapterSpec, TargetModule

# ---- the families ------------------------------------------------------------------------

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
          "<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
          "{% endif %}")
GEMMA = ("{{ bos_token }}{% for m in messages %}<start_of_turn>"
         "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}"
         "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n"
         "{% endif %}")
PHI3 = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
OASST = ("{% for m in messages %}{{ '<|prompter|>' if m['role'] == 'user' else '<|' + "
         "m['role'] + '|>' }}{{ m['content'] }}<|endoftext|>{% endfor %}"
         "{% if add_generation_prompt %}<|assistant|>{% endif %}")

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "max_position_embeddings": 256}
# name: (config class, config settings, template, specials: bos, eos, pad, others,
#        generation_config eos list or None, the turn end the site must stop at)
FAMILIES = {
    "llama": ("LlamaConfig", {**TINY, "num_key_value_heads": 2}, LLAMA3,
              ("<|begin_of_text|>", "<|end_of_text|>", "<|end_of_text|>",
               ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
              ["<|end_of_text|>", "<|eot_id|>"], "<|eot_id|>"),
    "qwen2": ("Qwen2Config", {**TINY, "num_key_value_heads": 2}, CHATML,
              (None, "<|im_end|>", "<|endoftext|>", ["<|im_start|>"]), None, "<|im_end|>"),
    "gemma": ("GemmaConfig", {**TINY, "num_key_value_heads": 1, "head_dim": 8}, GEMMA,
              ("<bos>", "<eos>", "<pad>", ["<start_of_turn>", "<end_of_turn>"]), None,
              "<end_of_turn>"),
    "phi3": ("Phi3Config", {**TINY, "num_key_value_heads": 2}, PHI3,
             ("<s>", "<|endoftext|>", "<|endoftext|>",
              ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]), None, "<|end|>"),
    "gpt2": ("GPT2Config", {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 256},
             CHATML, (None, "<|endoftext|>", "<|endoftext|>", ["<|im_start|>", "<|im_end|>"]),
             None, "<|im_end|>"),
    "gpt_neox": ("GPTNeoXConfig", TINY, OASST,
                 (None, "<|endoftext|>", "<|endoftext|>", ["<|prompter|>", "<|assistant|>",
                                                          "<|system|>"]),
                 None, "<|endoftext|>"),
}
CONV1D = {"gpt2"}

NAMES = ["ada", "bo", "cy", "dee", "eli", "fay", "gus", "hal", "ivy", "jo"]
CITIES = ["paris", "oslo", "lima", "cairo", "quito", "rome", "kyiv", "perth"]
THINGS = ["tea", "jazz", "chess", "maps", "kites", "bread", "owls", "rain"]


def corpus() -> list[str]:
    rng = random.Random(0)
    lines = []
    for _ in range(300):
        name, city, thing = rng.choice(NAMES), rng.choice(CITIES), rng.choice(THINGS)
        lines.append(rng.choice([f"my name is {name} and i live in {city}",
                                 f"where does {name} live? in {city}, i think",
                                 f"{name} likes {thing} and {rng.choice(THINGS)}",
                                 f"what do you like? i like {thing} a lot"]))
    return lines


def build_family(name: str, folder: Path) -> Path:
    """A tiny random model of the family with a byte-level BPE tokenizer of ~500 tokens
    trained on `corpus()`, its chat template, and a generation config; saved to `folder`."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

    config_class, settings, template, (bos, eos, pad, others), generation_eos, _ = \
        FAMILIES[name]
    specials = list(dict.fromkeys(t for t in (pad, bos, eos, *others) if t))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=500, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=bos, eos_token=eos,
                                        pad_token=pad)
    tokenizer.chat_template = template
    ids = {t: bpe.token_to_id(t) for t in specials}
    config = getattr(transformers, config_class)(
        vocab_size=bpe.get_vocab_size(), bos_token_id=ids.get(bos), eos_token_id=ids[eos],
        pad_token_id=ids[pad], **settings)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(
        bos_token_id=ids.get(bos), pad_token_id=ids[pad],
        eos_token_id=[ids[t] for t in generation_eos] if generation_eos else ids[eos])
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ---- the round ------------------------------------------------------------------------------

SESSIONS = [
    {"id": f"{who}-1", "messages": [
        {"role": "user", "content": f"my name is {who} and i live in {city}"},
        {"role": "assistant", "content": f"nice to meet you {who}"},
        {"role": "user", "content": "where do i live?"},
        {"role": "assistant", "content": f"in {city}"}]}
    for who, city in (("ada", "paris"), ("bo", "oslo"), ("cy", "lima"))]
FAST = DistillConfig(steps=2, prompts_per_step=2, samples_per_prompt=2,
                     max_new_tokens=6, dreams_per_lesson=2, guard_prompts_per_step=2)
CLIP = 1.0
PRIVACY = PrivacyPolicy(clip_norm=CLIP, noise_multiplier=1.0, epsilon_budget=10.0,
                        fixed_point_clip=1.0)


def aggregator_spec(spec: dict) -> AdapterSpec:
    """The aggregator's AdapterSpec from `adapter_spec`'s table, as server/config.py reads
    an [adapter] table, fan_in_fan_out included."""
    values = {k: v for k, v in spec.items() if k != "modules"}
    return AdapterSpec(modules=tuple(TargetModule(**m) for m in spec["modules"]), **values)


def site_update(model_dir: Path, folder: Path, session: dict, version: Path) -> SiteUpdate:
    """One site: ingest the session, consolidate it on the version's adapter, clip."""
    store_path = folder / "sessions.db"
    with SessionStore(store_path) as store:
        store.add(session)
        sessions = store.unconsumed()
    model, tokenizer = load_model(model_dir)
    peft_model = fleetmind_adapter(model, version)
    result = consolidate_sessions(peft_model, tokenizer, sessions, FAST, site=folder.name,
                                  base_version=0, seed=0, progress=False)
    delta = result.update.tensors
    norm = float(np.sqrt(sum(np.sum(np.square(t, dtype=np.float64)) for t in delta.values())))
    scale = min(1.0, 0.5 * CLIP / norm)
    assert norm > 0, "the consolidation learned nothing"
    return SiteUpdate(delta={n: (t * scale).astype(np.float32) for n, t in delta.items()},
                      clip_norm=CLIP, privacy_unit="session",
                      session_ids=tuple(s.id for s in sessions), norm_before_clip=norm)


def fleetmind_adapter(model, version: Path):
    """fleetmind's own loading of a version (client/site.py): the version's module paths,
    rank, alpha and seed, A from the seed, B from the file."""
    from fleetmind.server.versions import read_lora

    config = json.loads((version / "adapter_config.json").read_text())
    manifest = Manifest.from_bytes((version / "manifest.json").read_bytes())
    peft_model = lora.attach_lora(model, seed=manifest.frozen_a_seed, rank=int(config["r"]),
                                  alpha=float(config["lora_alpha"]),
                                  targets=config["target_modules"])
    a, b = read_lora(version / "adapter_model.safetensors")
    assert all(np.array_equal(lora.get_b(peft_model, "A")[n], a[n]) for n in a)
    lora.set_b(peft_model, b)
    return peft_model


def check_vllm_fields(config: dict, conv1d: bool) -> None:
    """What vLLM's PEFTHelper (vllm/lora/peft_helper.py) reads and refuses: r, lora_alpha and
    target_modules required; bias "none"; modules_to_save None; no DoRA, LoRA bias, layer
    replication or rank/alpha patterns; a plain init."""
    assert isinstance(config["r"], int) and config["r"] > 0
    assert isinstance(config["lora_alpha"], int | float) and config["lora_alpha"] > 0
    assert isinstance(config["target_modules"], list) and config["target_modules"]
    assert config["peft_type"] == "LORA" and config["bias"] == "none"
    assert config.get("modules_to_save") is None
    assert not config.get("use_dora") and not config.get("lora_bias")
    assert not config.get("layer_replication") and not config.get("rank_pattern")
    assert not config.get("alpha_pattern") and config.get("init_lora_weights", True) is True
    assert config.get("fan_in_fan_out", False) is conv1d


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a loaded machine OpenMP's
    spinning threads made each (20, 32) x (32, 64) product take 10 ms instead of 20 us."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_family_goes_through_a_secure_round(family, tmp_path) -> None:
    import torch
    from peft import PeftModel

    model_dir = build_family(family, tmp_path / "model")
    _, _, _, _, _, turn_end = FAMILIES[family]
    model, tokenizer = load_model(model_dir)
    # The turn end comes from the model's own template and generation config.
    assert tokenizer.convert_tokens_to_ids(turn_end) in turn_end_ids(tokenizer, model)

    spec = adapter_spec(model_dir, rank=4, alpha=8.0, frozen_a_seed=5)
    assert spec["base_model_sha256"] == base_model_hash(model_dir)
    assert spec["fan_in_fan_out"] is (family in CONV1D)
    assert {m["name"].rsplit(".", 2)[-2] for m in spec["modules"]} == {"mlp"}
    running = serve(ServerConfig(
        data_dir=tmp_path / "aggregator", listen="127.0.0.1:0", insecure=True,
        cohort=CohortPolicy(min_size=3, target_size=3, deadline_s=30, phase_deadline_s=30),
        privacy=PRIVACY, adapter=aggregator_spec(spec)))
    try:
        genesis = running.coordinator.registry.latest().folder
        public = running.coordinator.registry.public_key.public_bytes_raw()
        updates = [site_update(model_dir, tmp_path / f"site-{i}", session, genesis)
                   for i, session in enumerate(SESSIONS)]
        done = run_round(running.address, updates, tmp_path)
        assert {r.version for r in done} == {1}
        with grpc.insecure_channel(running.address) as channel:
            version = download_latest(channel, tmp_path / "site-0", public)
    finally:
        running.stop(grace=None)

    manifest = Manifest.from_bytes((version / "manifest.json").read_bytes())
    check_base_model(manifest, model_dir)  # before activating anything
    assert activate(tmp_path / "site-0", version, public) == 1
    config = json.loads((version / "adapter_config.json").read_text())
    ids = torch.tensor([chat_ids(tokenizer, SESSIONS[0]["messages"][:1], True)])
    with torch.no_grad():
        base, _ = load_model(model_dir)
        ours = fleetmind_adapter(base, version)(input_ids=ids).logits
        plain, _ = load_model(model_dir)
        before = plain(input_ids=ids).logits
        peft = PeftModel.from_pretrained(plain, version)(input_ids=ids).logits
    assert float((ours - peft).abs().max()) < 1e-5
    assert float((ours - before).abs().max()) > 0  # the merged update changed the model
    check_vllm_fields(config, family in CONV1D)


def run_round(address: str, updates: list[SiteUpdate], folder: Path) -> list[RoundResult]:
    def site(i: int) -> RoundResult:
        key = Ed25519PrivateKey.generate()
        with grpc.insecure_channel(address) as channel, \
                Outbox(folder / f"site-{i}" / "outbox.sqlite", key) as outbox:
            return participate(channel, key, f"site-{i}", updates[i], outbox,
                               add_noise=False, timeout=20)

    return each_returned(at_once(len(updates), site), RoundResult)


def test_a_site_refuses_a_version_for_another_base_model(tmp_path) -> None:
    model_dir = build_family("qwen2", tmp_path / "qwen2")
    other = Manifest(0, None, "other", "ab" * 32, 0, None, 0, 0.0, 0.0, "none", 0.0, 0.0,
                     {"adapter_config.json": "cd" * 32, "adapter_model.safetensors": "ef" * 32})
    with pytest.raises(VersionError, match="not this site's model"):
        check_base_model(other, model_dir)
