"""`fleetmind model build-random` (sim/random_model.py): model folders in real shapes with
random weights and a locally trained tokenizer, and `fleetmind bench consolidate --model DIR`
on one. Tests scale the shapes down (--layers, --vocab-size); everything else is the shape's."""

import importlib.util
import json
from pathlib import Path

import pytest

from fleetmind.cli.main import main
from fleetmind.client.store import Message, Session
from fleetmind.sim import random_model
from fleetmind.sim.bench import consolidate

CHAT = [{"role": "user", "content": "the food of shefoux is glesail ."},
        {"role": "assistant", "content": "noted ."}]


@pytest.fixture(scope="module")
def tiny_smollm2(tmp_path_factory) -> Path:
    """SmolLM2-135M's shape at one layer and a 600-id vocabulary, through the CLI."""
    out = tmp_path_factory.mktemp("random") / "smollm2"
    assert main(["model", "build-random", "--like", "smollm2-135m", "--out", str(out),
                 "--layers", "1", "--vocab-size", "600"]) == 0
    return out


def load(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(folder, local_files_only=True),
            AutoTokenizer.from_pretrained(folder, local_files_only=True))


def assert_shape(config, like: str, scaled: dict) -> None:
    """Every field of the named shape, but those the test scaled down, as published."""
    for key, value in random_model.SHAPES[like].config.items():
        if key == "rope_theta":  # transformers 5 keeps it under rope_parameters
            assert config.rope_parameters["rope_theta"] == value
        elif key in scaled:
            assert getattr(config, key) == scaled[key], key
        else:
            assert getattr(config, key) == value, key


def test_smollm2_shape_loads_offline_with_its_chat_template_and_turn_ends(tiny_smollm2) -> None:
    model, tokenizer = load(tiny_smollm2)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert_shape(model.config, "smollm2-135m", {"num_hidden_layers": 1, "vocab_size": 600})
    assert model.config.hidden_size == 576 and model.config.num_key_value_heads == 3
    assert len(tokenizer) == 600
    # The family's special tokens at its ids; eos ids from the generation config.
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == list(random_model.CHATML_SPECIALS)
    assert model.generation_config.eos_token_id == 2 == tokenizer.eos_token_id
    assert model.generation_config.bos_token_id == 1
    text = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                    "Hugging Face<|im_end|>\n<|im_start|>user\nthe food of shefoux is glesail ."
                    "<|im_end|>\n<|im_start|>assistant\nnoted .<|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = tokenizer.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True,
                                        return_dict=False)
    assert ids[0] == 1 and ids.count(2) == 3  # special tokens, not their letters
    assert tokenizer.decode(tokenizer.encode("Grüße, ünïcode ✓")) == "Grüße, ünïcode ✓"
    report = json.loads((tiny_smollm2 / "report.json").read_text())
    assert report["random_weights"] and report["overrides"] == {"layers": 1, "vocab_size": 600}
    assert report["tokenizer"]["padded"] == 0


def test_qwen25_shape_puts_its_specials_after_the_bpe_and_lists_two_turn_ends(tmp_path) -> None:
    out = tmp_path / "qwen"
    report = random_model.build_random("qwen2.5-0.5b", out, layers=1, vocab_size=500)
    model, tokenizer = load(out)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert_shape(model.config, "qwen2.5-0.5b",
                 {"num_hidden_layers": 1, "max_window_layers": 1, "vocab_size": 500})
    assert tokenizer.convert_ids_to_tokens([497, 498, 499]) == list(random_model.CHATML_SPECIALS)
    assert model.generation_config.eos_token_id == [499, 497]  # <|im_end|>, <|endoftext|>
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    text = tokenizer.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    assert text.endswith("<|im_start|>user\nthe food of shefoux is glesail .<|im_end|>\n"
                         "<|im_start|>assistant\n")
    assert report["parameters"] == sum(p.numel() for p in model.parameters())


def test_the_real_shapes_are_the_published_ones() -> None:
    """SmolLM2-135M's and Qwen2.5-0.5B's configurations and tokenizer sizes, as published."""
    smol = random_model.SHAPES["smollm2-135m"]
    assert (smol.config["hidden_size"], smol.config["intermediate_size"],
            smol.config["num_hidden_layers"], smol.config["num_attention_heads"],
            smol.config["num_key_value_heads"], smol.config["vocab_size"]) == (
        576, 1536, 30, 9, 3, 49152)
    assert smol.tokenizer_size == 49152 and smol.config["tie_word_embeddings"]
    qwen = random_model.SHAPES["qwen2.5-0.5b"]
    assert (qwen.config["hidden_size"], qwen.config["intermediate_size"],
            qwen.config["num_hidden_layers"], qwen.config["num_attention_heads"],
            qwen.config["num_key_value_heads"], qwen.config["vocab_size"]) == (
        896, 4864, 24, 14, 2, 151936)
    assert qwen.tokenizer_size == 151646  # 151,643 BPE ids, then the three specials


@pytest.mark.slow
def test_bpe_reaches_smollm2s_vocabulary_without_padding() -> None:
    tokenizer, trained = random_model.train_tokenizer(random_model.SHAPES["smollm2-135m"], 49152)
    assert len(tokenizer) == 49152 and trained["padded"] == 0


def test_build_random_refuses_an_unknown_shape(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["model", "build-random", "--like", "gpt-5", "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert main(["model", "build-random", "--like", "smollm2-135m", "--out",
                 str(tmp_path / "x"), "--vocab-size", "100"]) == 2
    assert "at least 300" in capsys.readouterr().err


def test_a_tokenizer_that_cannot_encode_the_sessions_is_refused(toy_model_dir) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(toy_model_dir, local_files_only=True)
    fine = Session(id="s1", messages=(Message("user", "what is the food of shefoux ?"),))
    consolidate.check_encodable(tokenizer, [fine])
    unknown = Session(id="s2", messages=(Message("user", "zyxwvut qqqq ?"),))
    with pytest.raises(ValueError, match="cannot encode"):
        consolidate.check_encodable(tokenizer, [fine, unknown])


def test_bench_consolidate_with_a_model_runs_the_cost_comparison_alone(
        tiny_smollm2, tmp_path, monkeypatch) -> None:
    """The wiring, each method's training faked (the slow test below trains for real): the
    alternated runs, the profiled run, the medians, the ratios and the report's scope."""
    from fleetmind.sim.bench import peer_sdft

    calls = []

    def fake(method, model_dir, sessions, cfg, workdir, threads=1, tensors=False):
        calls.append((method, cfg.steps, threads, tensors))
        seconds = {"ours": 10.0, "peer": 20.0}[method] + len(calls)
        cost = {key: 1.0 for key, _, _ in consolidate.COST_MEASURES}
        cost.update(seconds=seconds, distilled_tokens_per_s=100 / seconds, steps=2 * cfg.steps,
                    peak_tensor_mb={"ours": 30.0, "peer": 60.0}[method])
        return {}, cost

    monkeypatch.setattr(peer_sdft, "train_in_subprocess", fake)
    out = tmp_path / "bench"
    assert main(["bench", "consolidate", "--model", str(tiny_smollm2), "--out", str(out),
                 "--steps", "12", "--runs", "3", "--threads", "2"]) == 0
    report = json.loads((out / consolidate.MODEL_REPORT).read_text())
    methods = ["ours", "peer"] if importlib.util.find_spec("trl") else ["ours"]
    # Alternated timed runs, then one profiled run each, shorter (TENSOR_PEAK_STEPS).
    assert calls == [(m, 12, 2, False) for _ in range(3) for m in methods] + [
        (m, consolidate.TENSOR_PEAK_STEPS, 2, True) for m in methods]
    assert report["scope"] == consolidate.MODEL_SCOPE
    assert report["model"]["like"] == "smollm2-135m" and report["model"]["vocab_size"] == 600
    assert report["model"]["top_k"] == 0  # 600 ids: the whole vocabulary, as ours resolves
    assert report["ours"]["seconds"] == 10.0 + (3 if len(methods) == 2 else 2)  # the median
    assert report["ours"]["peak_tensor_mb"] == 30.0
    assert report["config"]["cost_runs"] == 3 and report["config"]["threads"] == 2
    if len(methods) == 2:
        assert report["ratios"]["peak_tensor_mb"] == 0.5
    assert not (out / "consolidate.json").exists()  # the toy benchmark's report: not this one


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("trl") is None,
                    reason="the peer, TRL's SDFTTrainer, is the `bench` extra")
def test_bench_consolidate_measures_the_cost_alone_on_any_model_folder(tiny_smollm2,
                                                                       tmp_path) -> None:
    """For real, one step a half, one run of each: about a minute of CPU (4 processes)."""
    out = tmp_path / "bench"
    assert main(["bench", "consolidate", "--model", str(tiny_smollm2), "--out", str(out),
                 "--steps", "1", "--runs", "1"]) == 0
    report = json.loads((out / consolidate.MODEL_REPORT).read_text())
    assert not (out / "consolidate.json").exists()  # the toy benchmark's report: not this one
    assert report["scope"] == consolidate.MODEL_SCOPE
    assert report["model"]["like"] == "smollm2-135m" and report["model"]["vocab_size"] == 600
    for method in ("ours", "peer"):
        cost = report[method]
        assert cost["steps"] == 2  # one step in each half
        assert cost["distilled_tokens"] > 0 and cost["peak_tensor_mb"] > 0, method
    assert set(report["ratios"]) == {key for key, _, _ in consolidate.COST_MEASURES}


def test_bench_consolidate_refuses_a_folder_without_a_model(tmp_path) -> None:
    assert main(["bench", "consolidate", "--model", str(tmp_path), "--out",
                 str(tmp_path / "o")]) == 2
