"""Payload codecs: JSON by default, pickle only when chosen by name.

A codec turns a payload into bytes at enqueue and back at lease. Encoding runs
before anything is written, so a payload that cannot be encoded fails in the
producer with :class:`~hostkit.exceptions.PayloadError` and the queue is untouched.

Why JSON by default: a queue outlives the code that wrote it, and messages may be
read by another language or another version of the app; unpickling data also runs
code, so it must be an explicit choice (``codec="pickle"``) on both sides.
"""

from __future__ import annotations

import json
import pickle
from typing import Any, Literal, Protocol, runtime_checkable

from .._util import describe
from ..exceptions import ConfigurationError, PayloadError

__all__ = ["Codec", "CodecName", "JsonCodec", "PickleCodec", "resolve_codec"]

#: The built-in codecs, by name.
CodecName = Literal["json", "pickle"]


@runtime_checkable
class Codec(Protocol):
    """Turns payloads into bytes and back; pass one as ``codec=`` for a custom format.

    .. versionadded:: 0.1
    """

    name: str

    def encode(self, payload: Any) -> bytes:
        """Bytes for ``payload``; raise :class:`~hostkit.exceptions.PayloadError` if it cannot be encoded."""
        ...

    def decode(self, data: bytes) -> Any:
        """The payload back from ``data``."""
        ...


# One encoder for every call: json.dumps with options builds a new one each time.
# allow_nan=False: NaN and Infinity are not JSON; other readers would choke on them.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


class JsonCodec:
    """Compact UTF-8 JSON: dicts, lists, strings, numbers, booleans and ``None``.

    .. versionadded:: 0.1
    """

    name = "json"

    def encode(self, payload: Any) -> bytes:
        try:
            text = _ENCODER.encode(payload)
        except (TypeError, ValueError) as err:
            msg = (
                f"the payload cannot be encoded as JSON ({err}); payload: {_short(payload)}. "
                f"Send only dicts, lists, str, int, float, bool and None (e.g. an id instead of an object, "
                f"isoformat() for a datetime), or choose codec='pickle' on the queue"
            )
            raise PayloadError(msg) from None
        return text.encode("utf-8")

    def decode(self, data: bytes) -> Any:
        try:
            return json.loads(data)
        except ValueError as err:
            msg = f"a message is not valid JSON ({err}); was it written with another codec? data: {data[:80]!r}"
            raise PayloadError(msg) from None

    def __repr__(self) -> str:
        return "<JsonCodec>"


class PickleCodec:
    """Python pickles (highest protocol). Only for queues every reader and writer trusts.

    .. versionadded:: 0.1
    """

    name = "pickle"

    def encode(self, payload: Any) -> bytes:
        try:
            return pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as err:  # pickling raises TypeError, PicklingError, AttributeError, ...
            msg = f"the payload cannot be pickled ({type(err).__name__}: {err}); payload: {_short(payload)}"
            raise PayloadError(msg) from None

    def decode(self, data: bytes) -> Any:
        try:
            return pickle.loads(data)  # opt-in codec, documented as for trusted producers only
        except Exception as err:
            msg = f"a message cannot be unpickled ({type(err).__name__}: {err}); was it written with another codec?"
            raise PayloadError(msg) from None

    def __repr__(self) -> str:
        return "<PickleCodec>"


def _short(payload: Any) -> str:
    text = describe(payload)
    return text if len(text) <= 120 else text[:117] + "..."


def resolve_codec(codec: CodecName | Codec) -> Codec:
    """The codec for ``codec=``: ``"json"``, ``"pickle"`` or a :class:`Codec` object."""
    if codec == "json":
        return JsonCodec()
    if codec == "pickle":
        return PickleCodec()
    if isinstance(codec, Codec) and not isinstance(codec, str):
        return codec
    msg = f"codec must be 'json', 'pickle' or an object with encode(payload) and decode(data), not: {describe(codec)}"
    raise ConfigurationError(msg)
