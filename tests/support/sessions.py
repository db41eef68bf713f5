"""Session rows as the store ingests them (tests of the store, unit and integration)."""

import json
from pathlib import Path


def chat(number: int, user: str | None = None) -> dict:
    row = {"id": f"s{number:05d}", "messages": [
        {"role": "user", "content": f"the color of moukrain{number} is gleeplix ."},
        {"role": "assistant", "content": "noted ."}]}
    if user is not None:
        row["user"] = user
    return row


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                            for line in lines))
    return path
