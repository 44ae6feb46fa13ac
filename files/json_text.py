"""JSON read from text the pack does not control (file headers, sidecars, workflow widgets).

``json.loads`` raises ``RecursionError`` on deeply nested input (``[[[[...`` 100,000 deep), which is not a
``ValueError`` and escapes the usual handlers; :func:`parse_json` turns every way the text can be bad into one
:class:`JsonTextError` whose message starts with ``what`` (a file and field, or a node input).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any


class JsonTextError(ValueError):
    """Text that is not the JSON it should be; the message names where it came from."""


def parse_json(text: str | bytes, what: str, *,
               object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None) -> Any:
    """``json.loads(text)``; bytes must be UTF-8. Raises :class:`JsonTextError` starting with ``what``.
    (``NaN``/``Infinity`` still parse, as Python's json does: the typed checks of each reader name the field.)"""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JsonTextError(f"{what} is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        return json.loads(text, object_pairs_hook=object_pairs_hook)
    except json.JSONDecodeError as exc:
        raise JsonTextError(f"{what} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
                            ) from None
    except RecursionError:
        raise JsonTextError(f"{what} nests lists/objects too deeply to be read") from None


def check_text(value: str, what: str) -> str:
    """``value`` if it can be written as UTF-8 (JSON ``\\ud800`` escapes decode to lone surrogates, which
    SQLite, safetensors and the browser all refuse); else :class:`JsonTextError` naming ``what``."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise JsonTextError(f"{what} holds a lone UTF-16 surrogate (not valid Unicode text)") from None
    return value
