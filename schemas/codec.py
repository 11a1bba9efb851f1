"""The one msgpack dialect every contract uses.

* ``str`` is packed as msgpack *str* (UTF-8) and ``bytes`` as msgpack *bin* (``use_bin_type=True``);
  unpacking gives back ``str`` and ``bytes`` (``raw=False``), so the two never mix.
* Maps keep insertion order. Every encoder in this package builds its map in the model's declared
  field order, so the same message always packs to the same bytes (handy for idempotency checks and
  golden tests).
* Unpacking rejects trailing bytes, non-string/bytes map keys (``strict_map_key``) and gives arrays
  as ``list``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgpack

CONTENT_TYPE = "application/msgpack"


def packb(obj: Mapping[str, Any]) -> bytes:
    """Pack a map. Floats are always float64; ints stay ints."""
    return msgpack.packb(obj, use_bin_type=True, use_single_float=False)


def unpackb(data: bytes | bytearray | memoryview) -> Any:
    """Unpack one msgpack object. Raises whatever ``msgpack`` raises on bad input
    (``ValueError`` subclasses such as ``ExtraData``/``FormatError``/``StackError``,
    ``UnicodeDecodeError``, ``TypeError``); callers turn that into their own error."""
    return msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True)


def kind_of(value: object) -> str:
    """A msgpack-ish name of a decoded value's type, for error details."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, bytes | bytearray):
        return "bin"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, dict):
        return "map"
    return type(value).__name__


def short_repr(value: object, limit: int = 64) -> str:
    """``repr`` cut to ``limit`` characters, so a hostile payload cannot blow up a log line."""
    text = repr(value)
    if len(text) > limit:
        return text[: limit - 3] + "..."
    return text
