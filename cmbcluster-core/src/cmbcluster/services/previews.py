"""Previews of the objects in a bucket, read with ranged reads, never whole: the beginning of a text
(JSON, CSV...) file, and the headers of a FITS file, the field's format.

A FITS file is a sequence of HDUs, each an ASCII header of 80-character cards in 2880-byte blocks,
ended by an ``END`` card, followed by its data padded to a whole block. The header says how long
the data is (``BITPIX``, ``NAXISn``, ``PCOUNT``, ``GCOUNT``), so the next header is found without
reading any data: a preview reads a few blocks per HDU, for a handful of HDUs, whatever the file's
size. (astropy would do it too, at the cost of a large dependency; this reads only what it shows.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from cmbcluster.interfaces import ObjectInfo
from cmbcluster.naming import validate_object_key

if TYPE_CHECKING:
    from cmbcluster.context import AppContext

__all__ = ["FitsCard", "FitsHdu", "Preview", "fits_headers", "parse_card", "preview_object"]

#: The most bytes of a text file a preview shows.
TEXT_PREVIEW_BYTES = 64 * 1024
BLOCK = 2880
CARD = 80
#: Blocks read at once for a header; most headers fit in one or two.
HEADER_READ_BLOCKS = 2
#: A header longer than this is shown cut (a few thousand cards: far more than anyone reads).
MAX_HEADER_BLOCKS = 36
#: HDUs shown: the primary and the first extensions (a Planck map's table is the first).
MAX_HDUS = 8

Kind = Literal["text", "json", "csv", "image", "fits", "none"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".svg", ".bmp", ".avif")
FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fz")
JSON_SUFFIXES = (".json", ".geojson", ".ipynb")
CSV_SUFFIXES = (".csv", ".tsv")
TEXT_SUFFIXES = (
    ".txt", ".md", ".rst", ".log", ".py", ".ini", ".cfg", ".conf", ".toml", ".yaml", ".yml", ".sh", ".tex",
    ".c", ".h", ".cpp", ".f90", ".jl", ".r", ".m", ".sql", ".xml", ".html", ".css", ".js", ".ts", ".dat", ".par",
)  # fmt: skip


@dataclass(frozen=True)
class FitsCard:
    keyword: str
    value: str
    comment: str


@dataclass
class FitsHdu:
    index: int
    name: str
    cards: list[FitsCard] = field(default_factory=list)
    truncated: bool = False


@dataclass
class Preview:
    kind: Kind
    text: str | None = None
    truncated: bool = False
    hdus: list[FitsHdu] | None = None
    message: str | None = None


def kind_of(key: str, content_type: str) -> Kind:
    name = key.rsplit("/", 1)[-1].lower()
    kind_type = content_type.split(";", 1)[0].strip().lower()
    if name.endswith(FITS_SUFFIXES) or kind_type in ("image/fits", "application/fits"):
        return "fits"
    if name.endswith(IMAGE_SUFFIXES) or (kind_type.startswith("image/") and kind_type != "image/fits"):
        return "image"
    if name.endswith(JSON_SUFFIXES) or kind_type == "application/json":
        return "json"
    if name.endswith(CSV_SUFFIXES) or kind_type in ("text/csv", "text/tab-separated-values"):
        return "csv"
    if name.endswith(TEXT_SUFFIXES) or kind_type.startswith("text/"):
        return "text"
    return "none"


def preview_object(context: AppContext, bucket: str, info: ObjectInfo) -> Preview:
    """What the files page shows of an object without downloading it (blocking: ranged reads)."""
    key = validate_object_key(info.key)

    def read(first: int, last: int) -> bytes:
        last = min(last, info.size - 1)
        if info.size == 0 or first > last:
            return b""
        return b"".join(context.storage.download_object(bucket, key, byte_range=(first, last)))

    kind = kind_of(key, info.content_type)
    if kind == "image":
        return Preview(kind="image")
    if kind == "fits":
        return _fits_or_none(read, info.size)
    head = read(0, TEXT_PREVIEW_BYTES - 1)
    if kind == "none" and (b"\0" in head[:8192] or not _is_text(head)):
        if head.startswith(b"SIMPLE  ="):
            return _fits_or_none(read, info.size)
        return Preview(kind="none", message="No preview for this kind of file: download it to open it.")
    text = head.decode("utf-8", errors="replace")
    if len(head) == TEXT_PREVIEW_BYTES and info.size > TEXT_PREVIEW_BYTES:
        text = text.rstrip("\ufffd")  # a character cut at the end of the range
    return Preview(kind="text" if kind == "none" else kind, text=text, truncated=info.size > len(head))


def _is_text(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start >= len(data) - 3  # only a character cut at the end of the range
    return True


def _fits_or_none(read: Callable[[int, int], bytes], size: int) -> Preview:
    hdus = fits_headers(read, size)
    if not hdus:
        return Preview(kind="none", message="This file does not start like a FITS file (no SIMPLE card).")
    return Preview(kind="fits", hdus=hdus)


def fits_headers(read: Callable[[int, int], bytes], size: int, *, max_hdus: int = MAX_HDUS) -> list[FitsHdu]:
    """The headers of a FITS file's first HDUs. ``read(first, last)`` returns those bytes (inclusive).

    Empty when the file is not FITS. A header without END within :data:`MAX_HEADER_BLOCKS` is
    returned cut (``truncated``), and the HDUs after it are not looked for.
    """
    hdus: list[FitsHdu] = []
    offset = 0
    while offset < size and len(hdus) < max_hdus:
        cards, header_bytes, complete = _read_header(read, offset)
        if not cards or (not hdus and not (cards[0].keyword == "SIMPLE" and cards[0].value == "T")):
            break
        values = {card.keyword: card.value for card in cards}
        default = "PRIMARY" if not hdus else (values.get("XTENSION", "").strip("' ") or f"HDU {len(hdus)}")
        name = values.get("EXTNAME", "").strip("' ").strip() or default
        hdus.append(FitsHdu(index=len(hdus), name=name, cards=cards, truncated=not complete))
        data = _data_bytes(values, primary=len(hdus) == 1)
        if not complete or data is None:
            break
        offset += header_bytes + math.ceil(data / BLOCK) * BLOCK
    return hdus


def _read_header(read: Callable[[int, int], bytes], offset: int) -> tuple[list[FitsCard], int, bool]:
    """(cards up to END, bytes of the header in whole blocks, whether END was found)."""
    cards: list[FitsCard] = []
    blocks = 0
    while blocks < MAX_HEADER_BLOCKS:
        wanted = min(HEADER_READ_BLOCKS, MAX_HEADER_BLOCKS - blocks)
        start = offset + blocks * BLOCK
        data = read(start, start + wanted * BLOCK - 1)
        usable = len(data) - len(data) % CARD
        if usable == 0:
            return cards, blocks * BLOCK, False
        for position in range(0, usable, CARD):
            raw = data[position : position + CARD]
            if not all(32 <= byte < 127 for byte in raw):
                return (cards, blocks * BLOCK, False) if cards else ([], 0, False)
            card = parse_card(raw.decode("ascii"))
            if card.keyword == "END":
                return cards, (blocks + position // BLOCK + 1) * BLOCK, True
            cards.append(card)
        if len(data) < wanted * BLOCK:
            return cards, blocks * BLOCK, False
        blocks += wanted
    return cards, blocks * BLOCK, False


def parse_card(text: str) -> FitsCard:
    """One 80-character header card: keyword, value (strings without their quotes) and comment."""
    keyword = text[:8].strip()
    if text[8:10] != "= " or keyword in ("COMMENT", "HISTORY", ""):
        return FitsCard(keyword=keyword, value=text[8:].rstrip(), comment="")
    rest = text[10:]
    stripped = rest.lstrip()
    if stripped.startswith("'"):
        chars: list[str] = []
        index = 1
        while index < len(stripped):
            char = stripped[index]
            if char == "'":
                if stripped[index + 1 : index + 2] == "'":  # '' is a quote inside the string
                    chars.append("'")
                    index += 2
                    continue
                break
            chars.append(char)
            index += 1
        after = stripped[index + 1 :]
        comment = after.split("/", 1)[1].strip() if "/" in after else ""
        return FitsCard(keyword=keyword, value="".join(chars).rstrip(), comment=comment)
    value, _, comment = rest.partition("/")
    return FitsCard(keyword=keyword, value=value.strip(), comment=comment.strip())


def _integer(values: dict[str, str], keyword: str, default: int | None = None) -> int | None:
    raw = values.get(keyword)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        return None


def _data_bytes(values: dict[str, str], *, primary: bool) -> int | None:
    """How many bytes of data follow a header (before padding); None when it cannot tell."""
    bitpix, naxis = _integer(values, "BITPIX"), _integer(values, "NAXIS")
    if bitpix is None or naxis is None or naxis < 0:
        return None
    if naxis == 0:
        return 0
    axes = [_integer(values, f"NAXIS{n}") for n in range(1, naxis + 1)]
    if any(axis is None or axis < 0 for axis in axes):
        return None
    sizes = [axis for axis in axes if axis is not None]
    if primary and sizes[0] == 0 and values.get("GROUPS") == "T":  # random groups: NAXIS1 = 0
        sizes = sizes[1:]
    pcount, gcount = _integer(values, "PCOUNT", 0), _integer(values, "GCOUNT", 1)
    if pcount is None or gcount is None:
        return None
    return abs(bitpix) // 8 * gcount * (pcount + math.prod(sizes))
