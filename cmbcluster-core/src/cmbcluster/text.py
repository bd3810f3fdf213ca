"""Text one user chooses and others read in listings (group names, object keys, e-mail addresses):
which characters would make it show as something else.

A name shown in a table, a CSV or a terminal is trusted to read as what it is. Control characters
break lines and terminals; Unicode's bidirectional controls reorder the text around them (the
"Trojan Source" trick: ``report\u202eftp.exe`` shows as ``reportexe.ptf``).
"""

from __future__ import annotations

import unicodedata

from cmbcluster.errors import InvalidRequest

#: The embedding, override and isolate controls (LRE, RLE, PDF, LRO, RLO, LRI, RLI, FSI, PDI) and
#: the implicit marks (LRM, RLM, ALM): each changes the order in which the characters around it are shown.
BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c")


#: Letters and marks drawn as nothing (Unicode's default-ignorable code points that ``isprintable``
#: passes): the Hangul fillers, the combining grapheme joiner, Khmer's inherent vowels and the
#: Mongolian vowel separator. ``adminㅤ@example.org`` (U+3164) would read as ``admin@example.org``.
#: (Variation selectors are left: emoji need them.)
INVISIBLE_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u034f\u17b4\u17b5\u180e")


def first_unprintable(text: str) -> str | None:
    """The first character of ``text`` that is not shown as itself, or None: controls, formatting
    characters (bidirectional controls, zero-width spaces and joiners), line and paragraph
    separators, unassigned code points and spaces other than U+0020 (Python's ``isprintable``), and
    the :data:`INVISIBLE_LETTERS`."""
    return next((ch for ch in text if not _shown(ch)), None)


def _shown(ch: str) -> bool:
    """Whether ``ch`` is shown as itself (see :func:`first_unprintable`)."""
    return ch.isprintable() and ch not in INVISIBLE_LETTERS


def first_bidi_control(text: str) -> str | None:
    """The first bidirectional control (embedding, override, isolate or mark) in ``text``, or None."""
    return next((ch for ch in text if ch in BIDI_CONTROLS), None)


def first_control_or_bidi(text: str) -> str | None:
    """The first control character (C0 or C1: a NUL, a line break, U+0085) or bidirectional control in
    ``text``, or None: what a name that becomes a path (an object key, a mount path) may not hold."""
    return next((ch for ch in text if unicodedata.category(ch) == "Cc" or ch in BIDI_CONTROLS), None)


#: The joiner controls (ZERO WIDTH NON-JOINER and JOINER): part of how words are spelled in Persian,
#: Arabic and the Indic scripts, and of emoji sequences; invisible beside Latin letters.
JOINERS = frozenset("\u200c\u200d")


def first_hidden_in_name(text: str) -> str | None:
    """The first character of a file name ``text`` that is shown as nothing or as a plain space, or
    None: what :func:`first_unprintable` finds (zero-width spaces, a byte order mark, a soft hyphen, a
    no-break space, line separators), except a joiner between two letters, marks or symbols that are
    not ASCII (``نیم‌فاصله``, an emoji sequence), where it belongs to the spelling."""
    for i, ch in enumerate(text):
        if _shown(ch):
            continue
        if (
            ch in JOINERS
            and 0 < i < len(text) - 1
            and all(not n.isascii() and unicodedata.category(n)[0] in "LMS" for n in (text[i - 1], text[i + 1]))
        ):
            continue
        return ch
    return None


def describe_character(ch: str) -> str:
    """``U+202E (RIGHT-TO-LEFT OVERRIDE)``: a character for an error message, never the character
    itself (which would reorder or break the message)."""
    name = unicodedata.name(ch, "")
    if not name and unicodedata.category(ch) == "Cc":
        name = "a control character"
    return f"U+{ord(ch):04X}" + (f" ({name})" if name else "")


def check_display_name(name: str, *, what: str, limit: int) -> str:
    """``name`` stripped, if it can name something people see (a group, an environment): 1 to
    ``limit`` printable characters. Such names are shown to admins in tables, the CSV and the
    terminal; a NUL, a line break or a right-to-left override there would disguise them."""
    name = name.strip()
    if not 1 <= len(name) <= limit:
        raise InvalidRequest(f"{what} of 1 to {limit} characters is required")
    bad = first_unprintable(name)
    if bad is not None:
        raise InvalidRequest(
            f"{what} is printable text: it cannot contain {describe_character(bad)} "
            "(no control, formatting, bidirectional or line-break characters)"
        )
    return name


def shown_name(name: str, *, limit: int) -> str:
    """A name someone else chose for a person (the ``name`` an identity provider sends, the
    development sign-in's field) made fit to show: a space of another kind becomes a space, any
    other character :func:`first_unprintable` finds goes, runs of spaces become one, and the result
    is cut to ``limit`` characters (the column's size). A sign-in never fails over a name."""
    kept = (" " if unicodedata.category(ch) == "Zs" else ch for ch in name
            if (ch.isprintable() or ch.isspace()) and ch not in INVISIBLE_LETTERS)  # fmt: skip
    return " ".join("".join(kept).split())[:limit].rstrip()


#: The longest e-mail address stored (``users.email``): 64 characters, "@" and a 255-character domain.
MAX_EMAIL_ADDRESS = 320


def check_email_address(address: str) -> str:
    """``address`` if it can be an e-mail address people read as itself: text around one ``@``, at
    most :data:`MAX_EMAIL_ADDRESS` characters, with no space and nothing :func:`first_unprintable`
    finds. Addresses are shown to admins (users, audit, CSV) and compared with ADMIN_EMAILS: a
    bidirectional control or a zero-width space would make one read as another's, a NUL or a line
    break would cut it short. InvalidRequest, naming the character, otherwise."""
    bad = first_unprintable(address) or (" " if " " in address else None)
    if bad is not None:
        raise InvalidRequest(
            f"an e-mail address cannot contain {describe_character(bad)} "
            "(no spaces, control, formatting, bidirectional or invisible characters)"
        )
    local, _, domain = address.partition("@")
    if not local or not domain or "@" in domain or len(address) > MAX_EMAIL_ADDRESS:
        raise InvalidRequest(f"{address!r} is not an e-mail address")
    return address
