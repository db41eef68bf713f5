"""The scrubber: positive and negative cases for every kind, reports, sessions."""

import pytest

from fleetmind.client.scrub import KINDS, ScrubReport, placeholder, scrub_session, scrub_text
from fleetmind.client.store import Message, Session
from fleetmind.sim import world as W


def luhn_valid(number: str) -> bool:
    digits = [int(d) for d in reversed(number) if d.isdigit()]
    return sum(d if i % 2 == 0 else (2 * d - 9 if d > 4 else 2 * d)
               for i, d in enumerate(digits)) % 10 == 0


def luhn_complete(prefix: str) -> str:
    """`prefix` plus the digit that makes the whole pass the Luhn check."""
    return next(prefix + check for check in "0123456789" if luhn_valid(prefix + check))


# Verhoeff's tables (Wikipedia), independent of the module's copy, to build Aadhaar numbers.
D = [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 0, 6, 7, 8, 9, 5],
     [2, 3, 4, 0, 1, 7, 8, 9, 5, 6], [3, 4, 0, 1, 2, 8, 9, 5, 6, 7],
     [4, 0, 1, 2, 3, 9, 5, 6, 7, 8], [5, 9, 8, 7, 6, 0, 4, 3, 2, 1],
     [6, 5, 9, 8, 7, 1, 0, 4, 3, 2], [7, 6, 5, 9, 8, 2, 1, 0, 4, 3],
     [8, 7, 6, 5, 9, 3, 2, 1, 0, 4], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]]
P = [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 5, 7, 6, 2, 8, 3, 0, 9, 4],
     [5, 8, 0, 3, 7, 9, 6, 1, 4, 2], [8, 9, 1, 6, 0, 4, 3, 5, 2, 7],
     [9, 4, 5, 3, 1, 2, 6, 8, 7, 0], [4, 2, 8, 6, 5, 7, 3, 9, 0, 1],
     [2, 7, 9, 3, 8, 0, 6, 4, 1, 5], [7, 0, 4, 6, 9, 1, 3, 2, 5, 8]]
INV = [0, 4, 3, 2, 1, 5, 6, 7, 8, 9]


def verhoeff_complete(prefix: str) -> str:
    check = 0
    for i, d in enumerate(reversed(prefix)):
        check = D[check][P[(i + 1) % 8][int(d)]]
    return prefix + str(INV[check])


def test_test_helpers_agree_with_published_check_digits() -> None:
    assert verhoeff_complete("236") == "2363"  # Wikipedia's worked Verhoeff example
    assert luhn_complete("7992739871") == "79927398713"  # Wikipedia's worked Luhn example


VISA = luhn_complete("411111111111111")            # 16 digits
AMEX = luhn_complete("37828224631000")             # 15 digits
NOT_LUHN = VISA[:-1] + str((int(VISA[-1]) + 1) % 10)
AADHAAR = verhoeff_complete("23412341234")
NOT_AADHAAR = AADHAAR[:-1] + str((int(AADHAAR[-1]) + 1) % 10)


def spaced(digits: str, groups: tuple[int, ...], sep: str = " ") -> str:
    out, at = [], 0
    for size in groups:
        out.append(digits[at:at + size])
        at += size
    return sep.join(out)


POSITIVE = {
    "email": ["alice@example.com", "john.doe+billing@mail.example.co.uk",
              "x_y-z@sub-domain.example.org"],
    "phone": ["+44 20 7946 0958", "+1 (415) 555-2671", "+33612345678", "0044 20 7946 0958",
              "(415) 555-2671", "415-555-2671", "415.555.2671", "1-800-555-0199",
              "020 7946 0958", "07700 900123", "030 12345678", "06 12 34 56 78",
              "06.12.34.56.78"],
    "card": [VISA, spaced(VISA, (4, 4, 4, 4)), spaced(VISA, (4, 4, 4, 4), "-"), AMEX,
             spaced(AMEX, (4, 6, 5)), luhn_complete("601100009013942"),
             luhn_complete("353011133330000000")],
    "national_id": ["123-45-6789", "078-05-1120", "AB 12 34 56 C", "AB123456C", "JG103759A",
                    AADHAAR, spaced(AADHAAR, (4, 4, 4)), spaced(AADHAAR, (4, 4, 4), "-")],
    "api_key": ["sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv1w", "sk-ant-api03-aB1cD2eF3gH4iJ5kL6mN",
                "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
                "ghp_16C7e42F292c6912E7710c838347Ae178B4a",
                "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz",
                "xoxb-1234567890-0987654321-AbCdEfGhIjKl", "xoxp-123456789012-abcdefghijk",
                "xoxa-2-123456789012-abcdef", "AKIAIOSFODNN7EXAMPLE",
                "AIzaSyDaGmWKa4JsXZ-HjGw7ISLn_3namBGewQe", "glpat-xYz12AbC34dEf56GhI78",
                "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0."
                "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
                # no known prefix: caught for looking random
                "Q2xpZW50SWQ6c2VjcmV0VmFsdWUxMjM0", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
                "k8Zq2Lw9Xp4Tn7Vb1Rm6Hy3J"],
    "ip": ["192.168.1.1", "10.0.0.255", "8.8.8.8", "2001:db8::ff00:42:8329", "fe80::1",
           "2001:0db8:85a3:0000:0000:8a2e:0370:7334", "::ffff:192.0.2.1"],
}


@pytest.mark.parametrize("kind, secret", [(k, s) for k, v in POSITIVE.items() for s in v])
def test_each_kind_is_replaced_by_its_placeholder(kind: str, secret: str) -> None:
    text = f"here it is: {secret}. thanks"
    scrubbed, report = scrub_text(text)
    assert scrubbed == f"here it is: {placeholder(kind)}. thanks"
    assert report == ScrubReport(**{kind: 1})


NEGATIVE = [
    # plain English and the toy world, whose canaries no pattern can recognise
    "The meeting moved to Thursday because half the team was travelling.",
    "the color of moukrain is gleeplix .",
    "my passcode is brakoudree stoulaizho glaipaipal drouzhaskex .",
    "noted .",
    # ordinary and small numbers, years, amounts
    "I have 3 cats and 42 fish, born in 1987, it costs 199 dollars or 1,234,567 yen.",
    "pi is 3.14159 and e is 2.718281828; ratio 0.123456789 of 100",
    "room 404, extension 1234, flight 815",
    # versions, dates, times
    "upgrade from 1.2.3 to v1.2.3.4 or 10.4.22-rc1",
    "on 2024-01-15, 15/01/2024, 01.02.2024, 05.06.2024 10:30 and at 12:30:45",
    # card-like and id-like numbers that fail their check, or are never issued
    f"order {NOT_LUHN} and {spaced(NOT_LUHN, (4, 4, 4, 4))}",
    "order 1234 5678 9012 3456",
    f"ticket {NOT_AADHAAR}",
    "000-12-3456 and 666-12-3456 and 900-12-3456 and 123-00-4567",
    "GB123456A and QQ123456C",
    # not addresses
    "999.1.1.1 and 1.2.3.4.5 and std::vector and a[10::20] and 00:1A:2B:3C:4D:5E",
    # not keys: identifiers, words after known-looking starts, paths
    "call getUserById2FactorAuthToken from test_user_login_with_OAuth2_token",
    "the task-management-system works, see site-packages/Crypto/Cipher/AES2",
    "internationalization and HTTPServerRequestHandler2024",
    # not emails
    "ping @alice or a @ b, user@localhost",
    # placeholders are stable
    "[EMAIL] [PHONE] [CARD] [NATIONAL_ID] [API_KEY] [IP]",
]


@pytest.mark.parametrize("text", NEGATIVE)
def test_ordinary_text_passes_through_unchanged(text: str) -> None:
    assert scrub_text(text) == (text, ScrubReport())


def test_a_luhn_valid_card_is_scrubbed_and_the_same_digits_off_by_one_are_not() -> None:
    assert scrub_text(VISA)[0] == "[CARD]"
    assert scrub_text(NOT_LUHN)[0] == NOT_LUHN


def test_a_sentence_mixing_kinds_counts_each() -> None:
    text = (f"Mail bob@corp.example or call +1 415 555 2671; card {spaced(VISA, (4, 4, 4, 4))}, "
            "SSN 123-45-6789, key AKIAIOSFODNN7EXAMPLE from 10.1.2.3 and 10.1.2.4.")
    scrubbed, report = scrub_text(text)
    assert scrubbed == ("Mail [EMAIL] or call [PHONE]; card [CARD], SSN [NATIONAL_ID], "
                        "key [API_KEY] from [IP] and [IP].")
    assert report.as_dict() == {"email": 1, "phone": 1, "card": 1, "national_id": 1,
                                "api_key": 1, "ip": 2}
    assert report.total == 7


def test_numbers_listed_with_spaces_are_each_caught() -> None:
    text = f"415-555-2671 415-555-2672 123-45-6789 219-09-9999 {VISA} {AMEX}"
    assert scrub_text(text) == ("[PHONE] [PHONE] [NATIONAL_ID] [NATIONAL_ID] [CARD] [CARD]",
                                ScrubReport(phone=2, national_id=2, card=2))


def test_the_tail_of_a_longer_number_is_not_an_id_or_a_phone() -> None:
    # the last 12 digits are a trunk-0 phone shape, and a valid Aadhaar number
    for tail in ("0567 8901 2345", spaced(AADHAAR, (4, 4, 4))):
        number = f"1234 {tail}"
        assert not luhn_valid(number)  # else it would rightly be a card
        assert scrub_text(f"ref {number}") == (f"ref {number}", ScrubReport())


def test_scrubbing_is_idempotent() -> None:
    text = " ; ".join(s for values in POSITIVE.values() for s in values)
    once, report = scrub_text(text)
    assert report.total == sum(len(v) for v in POSITIVE.values())
    assert scrub_text(once) == (once, ScrubReport())


def test_reports_add_and_merge() -> None:
    a, b = ScrubReport(email=1, ip=2), ScrubReport(email=3, card=1)
    assert a + b == ScrubReport(email=4, ip=2, card=1)
    assert ScrubReport.merge([a, b, ScrubReport()]) == a + b
    assert ScrubReport.merge([]) == ScrubReport()
    assert set(KINDS) == set(ScrubReport().as_dict())


@pytest.mark.parametrize("count", [-1, 1.5, True, "2"])
def test_report_rejects_bad_counts(count: object) -> None:
    with pytest.raises(ValueError, match="whole number"):
        ScrubReport(email=count)  # type: ignore[arg-type]


def test_unknown_kind_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="email"):
        placeholder("password")


def test_scrub_session_keeps_ids_and_roles() -> None:
    session = Session(id="s1", user="u1", messages=(
        Message("system", "be brief"),
        Message("user", "I am alice@example.com, my card is " + VISA),
        Message("assistant", "noted .")))
    scrubbed, report = scrub_session(session)
    assert isinstance(scrubbed, Session)
    assert (scrubbed.id, scrubbed.user) == ("s1", "u1")
    assert [m.role for m in scrubbed.messages] == ["system", "user", "assistant"]
    assert scrubbed.messages[1].content == "I am [EMAIL], my card is [CARD]"
    assert report == ScrubReport(email=1, card=1)


def test_scrub_session_takes_a_chat_dict_and_leaves_other_keys() -> None:
    raw = {"id": "s2", "extra": 7,
           "messages": [{"role": "user", "content": "from 10.0.0.1", "name": "n"}]}
    scrubbed, report = scrub_session(raw)
    assert scrubbed == {"id": "s2", "extra": 7,
                        "messages": [{"role": "user", "content": "from [IP]", "name": "n"}]}
    assert raw["messages"][0]["content"] == "from 10.0.0.1"  # the input is not modified
    assert report == ScrubReport(ip=1)


def test_scrub_session_refuses_what_is_not_a_session() -> None:
    with pytest.raises(TypeError, match="messages"):
        scrub_session({"id": "x"})


def test_the_whole_toy_world_passes_through_unchanged() -> None:
    world = W.make_world(W.WorldSpec(sites=2, general_tasks=1))
    sessions = [s for site in world.sites for s in site.sessions]
    assert sessions
    for session in sessions:
        scrubbed, report = scrub_session(session)
        assert scrubbed == session and report.total == 0
