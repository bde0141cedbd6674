"""A chunk as a delta against another: zstd with the other chunk's bytes as a raw dictionary.

A changed 4 KiB block costs its whole chunk when chunks travel as stored; the target
already holds the chunk that was in the same slot before, so zstd finds every unchanged
block there as one long match and the delta is about the size of what changed.
"""

from __future__ import annotations

import zstandard

from appliance.errors import IntegrityError

#: Deltas are made once per chunk sent over a WAN: a slower level than ingest's pays for itself.
DELTA_LEVEL = 3
#: A delta is sent only when it is at most this fraction of the stored record.
WORTH_IT = 0.9


def _dictionary(base: bytes) -> zstandard.ZstdCompressionDict:
    return zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)


def encode_delta(base: bytes, data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=DELTA_LEVEL, dict_data=_dictionary(base)).compress(data)


def decode_delta(base: bytes, payload: bytes | memoryview, raw_length: int, where: str) -> bytes:
    """The chunk a delta against `base` makes; IntegrityError if it does not decode to `raw_length` bytes."""
    try:
        data = zstandard.ZstdDecompressor(dict_data=_dictionary(base)).decompress(payload, max_output_size=raw_length)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"{where}: cannot decode the delta: {exc}") from None
    if len(data) != raw_length:
        raise IntegrityError(f"{where}: the delta decoded to {len(data)} bytes, expected {raw_length}")
    return data
