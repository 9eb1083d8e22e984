"""The msgpack encoding of numpy arrays that openpi-client uses (its `msgpack_numpy`): an array is
a map {b"__ndarray__": True, b"data": raw bytes, b"dtype": dtype.str, b"shape": shape}, a numpy
scalar {b"__npgeneric__": True, b"data": value, b"dtype": dtype.str}.

Maps whose keys are strings (`"__ndarray__"`, `"data"`, ...) are read the same way: msgpack
encoders outside Python often write map keys as strings.

Written here (a few lines) so that the server and our client do not depend on openpi-client,
and so that object arrays are refused instead of pickled; tests check it against the package.
"""

from __future__ import annotations

import functools

import msgpack
import numpy as np


class WireError(ValueError):
    """A msgpack frame that decodes, but whose array or scalar map is malformed."""


def _pack(obj):
    if isinstance(obj, (np.ndarray, np.generic)) and obj.dtype.kind in ("V", "O", "c"):
        raise ValueError(f"unsupported dtype {obj.dtype}")
    if isinstance(obj, np.ndarray):
        return {b"__ndarray__": True, b"data": np.ascontiguousarray(obj).tobytes(), b"dtype": obj.dtype.str,
                b"shape": obj.shape}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    return obj


def _field(obj: dict, name: str):
    """`obj[name]` under a bytes key (openpi's encoder) or a str key (msgpack encoders elsewhere
    that write map keys as strings); KeyError if neither."""
    key = name.encode()
    return obj[key] if key in obj else obj[name]


def _unpack(obj):
    if b"__ndarray__" in obj or "__ndarray__" in obj:
        try:
            data, dtype, shape = (_field(obj, "data"), np.dtype(_field(obj, "dtype")),
                                  tuple(_field(obj, "shape")))
            if dtype.hasobject or dtype.kind == "V":
                raise ValueError(f"dtype {dtype} is not a number type")
            return np.ndarray(buffer=data, dtype=dtype, shape=shape)
        except (KeyError, TypeError, ValueError) as err:
            raise WireError("an __ndarray__ map that is not an array "
                            f"({type(err).__name__}: {err})") from None
    if b"__npgeneric__" in obj or "__npgeneric__" in obj:
        try:
            return np.dtype(_field(obj, "dtype")).type(_field(obj, "data"))
        except (KeyError, TypeError, ValueError) as err:
            raise WireError("an __npgeneric__ map that is not a scalar "
                            f"({type(err).__name__}: {err})") from None
    return obj


packb = functools.partial(msgpack.packb, default=_pack)
unpackb = functools.partial(msgpack.unpackb, object_hook=_unpack)
