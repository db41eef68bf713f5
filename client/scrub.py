"""The scrubber: personal data and secrets out of a session before anything learns from it.

Every detector finds candidate spans with a regular expression and then checks them
(Luhn for cards, Verhoeff for Aadhaar, the `ipaddress` parser for IPs, entropy for
unknown tokens), so an ordinary number, date or version string stays as it is. Each
span becomes a typed placeholder such as `[EMAIL]`; a `ScrubReport` counts them.

What it recognises:
- emails;
- phone numbers: international (`+CC ...` or `00CC ...`, 8 to 15 digits as E.164 allows),
  North American (`(415) 555-2671`, `415-555-2671`, `1-800-555-0199`) and national numbers
  written with a trunk 0 (UK `020 7946 0958`, German `030 12345678`, French
  `06 12 34 56 78`: 10 to 12 digits);
- payment card numbers: 13 to 19 digits, plain or in the 4-4-4-4(-3) and 4-6-4/5
  groupings, only when the Luhn check holds;
- national ids: US Social Security numbers (`123-45-6789`, without the never-issued
  000/666/9xx areas, 00 groups, 0000 serials), UK National Insurance numbers
  (`AB 12 34 56 C`, HMRC's prefix rules) and Indian Aadhaar numbers (12 digits, first
  2-9, Verhoeff check digit);
- API keys and tokens: known prefixes (OpenAI/Anthropic `sk-`, Stripe `sk_live_`,
  GitHub `ghp_`/`github_pat_`, Slack `xox?-`, AWS `AKIA`/`ASIA`, Google `AIza`, GitLab
  `glpat-`, JWTs `eyJ...eyJ...`), and unknown high-entropy tokens (see `_looks_random`);
- IPv4 and IPv6 addresses.

What it cannot recognise, by design: a secret made of ordinary-looking words (the toy
world's canaries, "my passcode is brakoudree stoulaizho ..."), names, addresses.
Differential privacy, not scrubbing, is what protects those (docs/design.md "Differential privacy").
"""

from __future__ import annotations

import bisect
import ipaddress
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, overload

from fleetmind.client.store import Message, Session


@dataclass(frozen=True)
class ScrubReport:
    """How many spans of each kind were replaced. Reports add up across sessions."""

    email: int = 0
    phone: int = 0
    card: int = 0
    national_id: int = 0
    api_key: int = 0
    ip: int = 0

    def __post_init__(self) -> None:
        for kind in KINDS:
            count = getattr(self, kind)
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ValueError(f"ScrubReport.{kind}={count!r}: a count is a whole number >= 0")

    @property
    def total(self) -> int:
        return sum(self.as_dict().values())

    def as_dict(self) -> dict[str, int]:
        return {kind: getattr(self, kind) for kind in KINDS}

    def __add__(self, other: ScrubReport) -> ScrubReport:
        return ScrubReport(**{kind: getattr(self, kind) + getattr(other, kind) for kind in KINDS})

    @classmethod
    def merge(cls, reports: Iterable[ScrubReport]) -> ScrubReport:
        return sum(reports, cls())


KINDS: tuple[str, ...] = tuple(field.name for field in fields(ScrubReport))


def placeholder(kind: str) -> str:
    """`[EMAIL]`, `[API_KEY]`, ...: what a span of `kind` becomes."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: use one of {', '.join(KINDS)}")
    return f"[{kind.upper()}]"


# Digit runs: a match may not start or end inside a word or a dotted/dashed number, so
# "2024", "v1.2.3.4" and "2024-01-15" stay put. The shapes that fit inside the 4-4-4-4
# groups of a longer number (Aadhaar, trunk-0 phones) may not start right after a digit and
# a space either, or the last 12 digits of a non-Luhn "1234 0567 8901 2345" would match.
_START = r"(?<![\w.+\-/])(?<!\d[.\-/])"
_START_NOT_AFTER_DIGITS = r"(?<![\w.+\-/])(?<!\d[ .\-/])"
_END = r"(?![\w]|[.\-/]\d)"

_EMAIL = re.compile(r"(?<![\w.+\-])[A-Za-z0-9][A-Za-z0-9._%+\-]*"
                    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,}(?![\w\-])")

_KNOWN_KEY = re.compile(r"""(?<![\w\-])(?:
      sk-(?:proj-|ant-)?[A-Za-z0-9_\-]{20,}               # OpenAI, Anthropic
    | (?:sk|pk|rk)_(?:live|test)_[A-Za-z0-9]{16,}          # Stripe
    | gh[pousr]_[A-Za-z0-9]{30,}                           # GitHub tokens
    | github_pat_[A-Za-z0-9_]{30,}                         # GitHub fine-grained tokens
    | xox[abprs]-[A-Za-z0-9\-]{10,}                        # Slack
    | (?:AKIA|ASIA)[A-Z0-9]{16}                            # AWS access key ids
    | AIza[A-Za-z0-9_\-]{35}                               # Google API keys
    | glpat-[A-Za-z0-9_\-]{20,}                            # GitLab
    | eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}  # JWT
    )(?![\w\-])""", re.VERBOSE)

# IPv6 candidates: runs of hex digits, colons and dots with at least two colons; the
# `ipaddress` parser decides. Runs before IPv4 so `::ffff:192.0.2.1` is one address.
_IPV6 = re.compile(r"(?<![\w:.])[0-9A-Fa-f.]*:[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*")
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)")

_CARD = re.compile(_START + r"(?:\d{4}([ \-])\d{4}\1\d{4}\1\d{4}(?:\1\d{3})?"  # 16 or 19
                            r"|\d{4}([ \-])\d{6}\2\d{4,5}"                     # Amex, Diners
                            r"|\d{13,19})" + r"(?![\w\-])")

_SSN = re.compile(_START + r"(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}" + _END)
# HMRC: first letter not D F I Q U V, second not D F I Q U V O, and never BG GB NK KN TN NT ZZ.
_UK_NINO = re.compile(r"(?<![\w])(?!BG|GB|NK|KN|TN|NT|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z]"
                      r" ?\d{2} ?\d{2} ?\d{2} ?[A-D](?!\w)")
_AADHAAR = re.compile(_START_NOT_AFTER_DIGITS + r"[2-9]\d{3}([ \-]?)\d{4}\1\d{4}" + _END)

_PHONE_INTERNATIONAL = re.compile(r"(?<![\w+])(?:\+|\b00)[1-9](?:[ .\-()]{0,2}\d){6,14}(?!\w)")
_PHONE_NORTH_AMERICA = re.compile(_START + r"(?:1[ .\-])?(?:\(\d{3}\) ?|\d{3}[ .\-])"
                                           r"\d{3}[ .\-]\d{4}" + _END)
_PHONE_TRUNK_ZERO = re.compile(_START_NOT_AFTER_DIGITS + r"(?:\(0\d{1,4}\) ?|0\d{1,4})"
                                                         r"(?:[ .\-/]?\d){5,10}" + _END)
# "05.06.2024 10" has ten digits and a leading 0, but it is a date and a time.
_DATE_PREFIX = re.compile(r"\d{1,2}([./\-])\d{1,2}\1(?:\d{4}|\d{2})(?![./\-]?\d)")

_TOKEN = re.compile(r"(?<![\w+/=\-])[A-Za-z0-9_+/\-]{20,}={0,2}(?![\w+/=\-])")
_WORDLIKE = re.compile(r"[a-z]{3,}")


def _digits(text: str) -> str:
    return "".join(ch for ch in text if ch.isdigit())


def _luhn_ok(digits: str) -> bool:
    total = 0
    for position, digit in enumerate(reversed(digits)):
        value = int(digit) * (2 if position % 2 else 1)
        total += value - 9 if value > 9 else value
    return total % 10 == 0


# Verhoeff's dihedral-group tables: d is the group's multiplication, p the position
# permutation. The check catches every single-digit error and every adjacent swap.
_VERHOEFF_D = [
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 0, 6, 7, 8, 9, 5],
    [2, 3, 4, 0, 1, 7, 8, 9, 5, 6], [3, 4, 0, 1, 2, 8, 9, 5, 6, 7],
    [4, 0, 1, 2, 3, 9, 5, 6, 7, 8], [5, 9, 8, 7, 6, 0, 4, 3, 2, 1],
    [6, 5, 9, 8, 7, 1, 0, 4, 3, 2], [7, 6, 5, 9, 8, 2, 1, 0, 4, 3],
    [8, 7, 6, 5, 9, 3, 2, 1, 0, 4], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0],
]
_VERHOEFF_P = [
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 5, 7, 6, 2, 8, 3, 0, 9, 4],
    [5, 8, 0, 3, 7, 9, 6, 1, 4, 2], [8, 9, 1, 6, 0, 4, 3, 5, 2, 7],
    [9, 4, 5, 3, 1, 2, 6, 8, 7, 0], [4, 2, 8, 6, 5, 7, 3, 9, 0, 1],
    [2, 7, 9, 3, 8, 0, 6, 4, 1, 5], [7, 0, 4, 6, 9, 1, 3, 2, 5, 8],
]


def _verhoeff_ok(digits: str) -> bool:
    check = 0
    for position, digit in enumerate(reversed(digits)):
        check = _VERHOEFF_D[check][_VERHOEFF_P[position % 8][int(digit)]]
    return check == 0


def _shannon_bits(text: str) -> float:
    counts = Counter(text)
    return -sum(n / len(text) * math.log2(n / len(text)) for n in counts.values())


def _looks_random(token: str) -> bool:
    """A token of 20+ characters that mixes upper case, lower case and digits, with at least
    3.5 bits of entropy per character, and at most half of its letters in lowercase runs of
    three or more (words): entropy alone cannot tell random tokens from identifiers, hence
    the word test (catch and false-positive rates: docs/measurements.md "Scrubbing")."""
    if not (any(c.isupper() for c in token) and any(c.islower() for c in token)
            and any(c.isdigit() for c in token)):
        return False
    letters = sum(c.isalpha() for c in token)
    in_words = sum(len(word) for word in _WORDLIKE.findall(token))
    return _shannon_bits(token) >= 3.5 and in_words <= 0.5 * letters


Span = tuple[int, int]


def _matches(pattern: re.Pattern[str], check: Callable[[str], bool] = lambda _: True
             ) -> Callable[[str], Iterator[Span]]:
    def find(text: str) -> Iterator[Span]:
        for match in pattern.finditer(text):
            if check(match.group()):
                yield match.span()
    return find


def _find_ipv6(text: str) -> Iterator[Span]:
    for match in _IPV6.finditer(text):
        candidate = match.group().rstrip(".")
        end = match.start() + len(candidate)
        if end < len(text) and (text[end].isalnum() or text[end] == "_"):
            continue
        # "x[10::20]" is a Python slice, not an address: ask for 3 colons or a 3-hex group.
        groups = candidate.split(":")
        if candidate.count(":") < 3 and max(len(g) for g in groups) < 3:
            continue
        try:
            ipaddress.IPv6Address(candidate)
        except ValueError:
            continue
        yield match.start(), end


def _card_ok(candidate: str) -> bool:
    digits = _digits(candidate)
    return 13 <= len(digits) <= 19 and digits[0] != "0" and _luhn_ok(digits)


def _international_phone_ok(candidate: str) -> bool:
    digits = _digits(candidate)
    if candidate.startswith("00"):
        digits = digits[2:]
    return 8 <= len(digits) <= 15


def _trunk_zero_phone_ok(candidate: str) -> bool:
    return 10 <= len(_digits(candidate)) <= 12 and not _DATE_PREFIX.match(candidate)


# In priority order: a span is kept only when it overlaps no span an earlier detector kept,
# so a Luhn-valid card is never half-eaten by a phone pattern.
_DETECTORS: tuple[tuple[str, Callable[[str], Iterator[Span]]], ...] = (
    ("email", _matches(_EMAIL)),
    ("api_key", _matches(_KNOWN_KEY)),
    ("ip", _find_ipv6),
    ("ip", _matches(_IPV4, lambda s: all(int(octet) <= 255 for octet in s.split(".")))),
    ("card", _matches(_CARD, _card_ok)),
    ("national_id", _matches(_SSN)),
    ("national_id", _matches(_UK_NINO)),
    ("national_id", _matches(_AADHAAR, lambda s: _verhoeff_ok(_digits(s)))),
    ("phone", _matches(_PHONE_INTERNATIONAL, _international_phone_ok)),
    ("phone", _matches(_PHONE_NORTH_AMERICA)),
    ("phone", _matches(_PHONE_TRUNK_ZERO, _trunk_zero_phone_ok)),
    ("api_key", _matches(_TOKEN, _looks_random)),
)


def scrub_text(text: str) -> tuple[str, ScrubReport]:
    """Returns the text with every recognised span replaced by its placeholder, and the
    counts by kind. Scrubbing scrubbed text changes nothing."""
    if not isinstance(text, str):
        raise TypeError(f"scrub_text takes a str, got {type(text).__name__}")
    kept: list[tuple[int, int, str]] = []  # sorted and disjoint: neighbours tell overlap
    for kind, find in _DETECTORS:
        for start, end in find(text):
            at = bisect.bisect(kept, (start, end))
            if (at == 0 or kept[at - 1][1] <= start) and (at == len(kept) or kept[at][0] >= end):
                kept.insert(at, (start, end, kind))
    pieces, cursor = [], 0
    for start, end, kind in kept:
        pieces += [text[cursor:start], placeholder(kind)]
        cursor = end
    pieces.append(text[cursor:])
    return "".join(pieces), ScrubReport(**Counter(kind for _, _, kind in kept))


@overload
def scrub_session(session: Session) -> tuple[Session, ScrubReport]: ...
@overload
def scrub_session(session: Mapping[str, Any]) -> tuple[dict[str, Any], ScrubReport]: ...


def scrub_session(session: Session | Mapping[str, Any]
                  ) -> tuple[Session | dict[str, Any], ScrubReport]:
    """Scrubs the content of every message. A `Session` comes back as a `Session`, a chat
    dict (`{"messages": [...], ...}`) as a copy with its other keys untouched. The session
    and end-user ids stay: they never leave the site, and the privacy unit needs them."""
    if isinstance(session, Session):
        scrubbed = [scrub_message(message) for message in session.messages]
        return (replace(session, messages=tuple(message for message, _ in scrubbed)),
                ScrubReport.merge(report for _, report in scrubbed))
    if not isinstance(session, Mapping) or not isinstance(session.get("messages"), list):
        raise TypeError("scrub_session takes a Session or a chat dict with a 'messages' list, "
                        f"got {type(session).__name__}")
    messages, reports = [], []
    for message in session["messages"]:
        clean, report = _scrub_chat_turn(message)
        messages.append(clean)
        reports.append(report)
    return {**session, "messages": messages}, ScrubReport.merge(reports)


def scrub_message(message: Message) -> tuple[Message, ScrubReport]:
    """A turn's content and its tool calls' arguments scrubbed (a call's arguments carry
    what the user said as often as the content does). Names and ids stay."""
    text, report = scrub_text(message.content)
    calls = []
    for call in message.tool_calls:
        arguments, found = scrub_text(call.arguments)
        calls.append(replace(call, arguments=arguments))
        report += found
    return replace(message, content=text, tool_calls=tuple(calls)), report


def _scrub_chat_turn(turn: Mapping[str, Any]) -> tuple[dict[str, Any], ScrubReport]:
    """A chat dict's turn as the API writes it: string, null or parts content, tool calls."""
    clean, report = dict(turn), ScrubReport()
    content = turn.get("content")
    if isinstance(content, str):
        clean["content"], report = scrub_text(content)
    elif isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                text, found = scrub_text(part["text"])
                parts.append({**part, "text": text})
                report += found
            else:
                parts.append(part)
        clean["content"] = parts
    if isinstance(turn.get("tool_calls"), list):
        calls = []
        for call in turn["tool_calls"]:
            function = call.get("function") if isinstance(call, Mapping) else None
            if isinstance(function, Mapping) and isinstance(function.get("arguments"), str):
                arguments, found = scrub_text(function["arguments"])
                call = {**call, "function": {**function, "arguments": arguments}}
                report += found
            calls.append(call)
        clean["tool_calls"] = calls
    return clean, report
