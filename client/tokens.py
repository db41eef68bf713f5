"""Chat messages as token ids, rows padded into a batch, and the tokens that end a turn:
what every part of consolidation, and the serving engine, needs to put a conversation before
a model. Kept apart from the distillation (client/distill.py) because none of it learns.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def chat_ids(tokenizer: Any, messages: Sequence[dict[str, str]], generation: bool) -> list[int]:
    text = tokenizer.apply_chat_template(list(messages), tokenize=False,
                                         add_generation_prompt=generation)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def user_turn_prefix_ids(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Tokens of `messages` followed by the opening of a new user turn: what the teacher
    continues to write a dream. Works for any chat template (cut at a marker)."""
    marker = "\u2063fleetmind-dream\u2063"
    text = tokenizer.apply_chat_template([*messages, {"role": "user", "content": marker}],
                                         tokenize=False)
    return tokenizer(text[: text.index(marker)], add_special_tokens=False)["input_ids"]


def pad_right(rows: Sequence[Sequence[int]], pad: int) -> Any:
    import torch

    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(list(row), dtype=torch.long)
    return ids


def pad_left(rows: Sequence[Sequence[int]], pad: int) -> tuple[Any, Any]:
    """Rows right-aligned in one batch: ids (B, L) and the attention mask of the real ones."""
    import torch

    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, length - len(row):] = torch.tensor(list(row), dtype=torch.long)
        mask[i, length - len(row):] = 1
    return ids, mask


def model_device(model: Any) -> Any:
    """The device the model's weights are on: where every input must be made."""
    return next(model.parameters()).device


def positions(mask: Any) -> Any:
    """Each real token's position in its own row, from a left-padded batch's mask."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def turn_end_ids(tokenizer: Any, model: Any = None) -> set[int]:
    """The tokens that end a turn, where sampling stops: the tokenizer's end of sequence,
    every `eos_token_id` of the model's generation config (Llama 3's <|eot_id|>, Gemma's
    <end_of_turn>, Qwen's <|im_end|> list themselves there), and the special token the
    chat template writes right after a message (`template_turn_end`), for model folders
    without a generation config."""
    ends = {tokenizer.eos_token_id, template_turn_end(tokenizer)}
    config = getattr(model, "generation_config", None) if model is not None else None
    listed = getattr(config, "eos_token_id", None)
    ends.update(listed if isinstance(listed, list | tuple) else [listed])
    return {t for t in ends if isinstance(t, int)}


def template_turn_end(tokenizer: Any) -> int | None:
    """The special token the chat template writes after an assistant message's content
    (ChatML's <|im_end|>, Phi-3's <|end|>, Gemma's <end_of_turn>), or None when what follows
    the content is not one special token."""
    from jinja2 import TemplateError

    marker = "\u2063fleetmind-turn\u2063"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
            tokenize=False)
    except (TemplateError, ValueError, TypeError):  # no template, or one that cannot render
        return None  # a user-assistant exchange: it names no turn end
    if marker not in text:
        return None
    after = text[text.index(marker) + len(marker):].lstrip()
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    return ids[0] if ids and ids[0] in special else None
