"""Label Studio brush RLE, vectorised.

The format is the one ``label_studio_sdk.converter.brush`` writes and reads (and the Label Studio
frontend draws): a bit stream with a header (32 bits: number of values; 5 bits: word size - 1;
4 x 4 bits: the run-length field sizes - 1, normally 3, 4, 8, 16), then tokens. A token starts with
1 bit (1: a run of one value; 0: a list of literal values), 2 bits choosing a run-length field size,
the run length - 1 in that many bits, then the value(s) in ``word size`` bits. Values are the
flattened RGBA pixels of the image (4 per pixel); a mask is 0/255 in every channel and is read back
from the alpha channel.

The SDK's encoder and decoder walk the stream one bit at a time in Python (seconds for a full-size
mammogram); these do the same with numpy, and the tests check both ways against the SDK.
"""

from __future__ import annotations

import numpy as np

from workspace.base.errors import MammoError

_SIZES = (3, 4, 8, 16)
_HEADER_BITS = 32 + 5 + 16


class RleError(MammoError):
    """A brush RLE that cannot be decoded, or that does not fit the image it claims to cover."""


def _pixel_runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, values) of the runs of a 2-D mask (bool: values 0/255; uint8: its own levels) flattened
    row-major, looking only at the rows that hold a non-zero pixel (a unit's mask covers a patch or two
    of a full mammogram)."""
    height, width = mask.shape
    n = height * width
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.uint8)
    first, last = int(rows[0]) * width, (int(rows[-1]) + 1) * width
    band = mask[rows[0]:rows[-1] + 1].ravel()
    starts = [np.zeros(1, dtype=np.int64)]
    if first > 0 and band[0]:
        starts.append(np.array([first], dtype=np.int64))
    starts.append(np.flatnonzero(band[1:] != band[:-1]).astype(np.int64) + 1 + first)
    if last < n and band[-1]:
        starts.append(np.array([last], dtype=np.int64))
    starts = np.concatenate(starts)
    inside = (starts >= first) & (starts < last)
    values = np.zeros(starts.size, dtype=np.uint8)
    picked = band[starts[inside] - first]
    values[inside] = picked.astype(np.uint8) * 255 if band.dtype == bool else picked  # uint8: its own levels
    return starts, values


def encode_mask(mask: np.ndarray, *, alpha: bool = False) -> list[int]:
    """A 2-D mask as Label Studio brush RLE (a list of byte values): every non-zero pixel -> 255; with
    ``alpha`` a uint8 array keeps its levels (Label Studio draws a brush pixel with that alpha, so 128 is
    see-through; read back as >= 128)."""
    mask = np.asarray(mask)
    if alpha and mask.dtype != np.uint8:
        raise RleError(f"alpha levels are uint8, not {mask.dtype}")
    if mask.ndim != 2:
        raise RleError(f"a brush mask is 2-D, not of shape {mask.shape}")
    n = mask.size
    if n == 0:
        raise RleError("cannot encode an empty image")
    starts, pixel_values = _pixel_runs(mask if alpha or mask.dtype == bool else mask > 0)
    lengths = np.diff(np.concatenate([starts, [n]])) * 4  # RGBA: every pixel is 4 equal values
    values = pixel_values.astype(np.int64)
    # runs longer than 2**16 become several 16-bit-field tokens of 2**16 each, then the remainder
    chunks = np.where(lengths > 65536, (lengths - 1) // 65536, 0)
    n_tok = chunks + 1
    tok_run = np.repeat(np.arange(len(lengths)), n_tok)
    first_of_run = np.cumsum(n_tok) - n_tok
    k = np.arange(len(tok_run)) - np.repeat(first_of_run, n_tok)  # token index inside its run
    last = k == chunks[tok_run]
    tok_len = np.where(last, lengths[tok_run] - chunks[tok_run] * 65536, 65536)
    tok_val = values[tok_run]
    run_len = lengths[tok_run]  # the field size follows the whole run's length (as the SDK writes it)
    size_index = np.select([run_len <= 8, run_len <= 16, run_len <= 256], [0, 1, 2], 3)
    field = np.array(_SIZES)[size_index]
    n_bits = 1 + 2 + field + 8
    code = (((1 << 2 | size_index) << field | (tok_len - 1)) << 8) | tok_val
    width = 27
    shifts = np.arange(width - 1, -1, -1)
    bits = (code[:, None] >> shifts[None, :]) & 1
    keep = shifts[None, :] < n_bits[:, None]
    body = bits[keep].astype(np.uint8)
    header = f"{n * 4:032b}{8 - 1:05b}" + "".join(f"{s - 1:04b}" for s in _SIZES)
    head = np.frombuffer(header.encode(), dtype=np.uint8) - 48
    stream = np.concatenate([head, body])
    pad = 8 - stream.size % 8  # the SDK always pads (a whole zero byte when already aligned)
    stream = np.concatenate([stream, np.zeros(pad, dtype=np.uint8)])
    return np.packbits(stream).tolist()


def decode_runs(rle: list[int] | bytes | np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """``(n_values, starts, values)`` of a brush RLE: runs of equal values (RGBA order); :class:`RleError`
    when malformed."""
    try:
        data = np.asarray(rle, dtype=np.int64)
    except (TypeError, ValueError):
        raise RleError("the brush RLE is not a list of byte values") from None
    if data.ndim != 1 or data.size * 8 < _HEADER_BITS:
        raise RleError("the brush RLE is too short to hold its header")
    if data.min() < 0 or data.max() > 255:
        raise RleError("the brush RLE holds values outside 0..255")
    bits = np.unpackbits(data.astype(np.uint8))
    text = (bits + 48).tobytes().decode()
    total = len(text)

    def read(pos: int, n: int) -> int:
        if pos + n > total:
            raise RleError("the brush RLE ends in the middle of a run (truncated?)")
        return int(text[pos:pos + n], 2)

    num = read(0, 32)
    word = read(32, 5) + 1
    sizes = [read(37 + 4 * i, 4) + 1 for i in range(4)]
    if num == 0:
        raise RleError("the brush RLE covers no pixels")
    pos = _HEADER_BITS
    starts: list[int] = []
    values: list[int] = []
    i = 0
    while i < num:
        if pos >= total:
            raise RleError(f"the brush RLE ends after {i} of its {num} values (truncated?)")
        series = text[pos] == "1"
        field = sizes[read(pos + 1, 2)]
        count = read(pos + 3, field) + 1
        pos += 3 + field
        if series:
            starts.append(i)
            values.append(read(pos, word))
            pos += word
        else:
            for k in range(count):
                starts.append(i + k)
                values.append(read(pos, word))
                pos += word
        i += count
    if i != num:
        raise RleError(f"the brush RLE's runs cover {i} values, its header says {num}")
    return num, np.asarray(starts, dtype=np.int64), np.asarray(values, dtype=np.int64)


def decode_values(rle: list[int] | bytes | np.ndarray) -> np.ndarray:
    """The flat uint8 values of a brush RLE (RGBA order)."""
    num, starts, values = decode_runs(rle)
    return np.repeat(values.astype(np.uint8), np.diff(np.concatenate([starts, [num]])))


def decode_mask(rle: list[int] | bytes | np.ndarray, width: int, height: int) -> np.ndarray:
    """A brush RLE as a bool mask of shape (height, width) (alpha channel >= 128)."""
    num, starts, values = decode_runs(rle)
    if num != width * height * 4:
        raise RleError(f"the brush RLE holds {num // 4} pixels, but the image is {width} x {height} "
                       f"({width * height} pixels)")
    ends = np.concatenate([starts[1:], [num]])
    on = values >= 128
    # pixel p's alpha is value 4p + 3: the pixels whose alpha lies in [start, end)
    first_pixel = -((3 - starts[on]) // 4)     # ceil((start - 3) / 4)
    last_pixel = (ends[on] - 4) // 4            # floor((end - 4) / 4)
    flat = np.zeros(width * height, dtype=bool)
    for a, b in zip(first_pixel.tolist(), last_pixel.tolist(), strict=True):
        if b >= a:
            flat[a:b + 1] = True
    return flat.reshape(height, width)


__all__ = ["RleError", "encode_mask", "decode_runs", "decode_values", "decode_mask"]
