"""The compact on-disk form of a model: each state_dict tensor in the smallest exact encoding.

Encodings (chosen per tensor, whichever is fewest bytes; dense wins ties):
- dense: the raw values.
- sparse: a bitmask of the nonzero positions (1 bit per element) and the nonzero values.
- codebook: the tensor's distinct values (at most 256) and one index per element, bit-packed at
  ceil(log2(distinct)) bits (0 bits when every element is equal).
- sparse_codebook: the bitmask, the distinct nonzero values, and bit-packed indices of the nonzeros
  (pruning followed by k-means weight sharing, as in Deep Compression).

Nothing is assumed from how a tensor was made: values are compared by their bit patterns, so a
round trip gives identical tensors (-0.0 is stored as +0.0, the one difference torch.equal ignores).

File layout (little-endian): b"SFPK", version u8, flags u8 (bit 0: the rest is zlib-compressed), then
u32 tensor count and per tensor: u16 name length, name (UTF-8), dtype code u8, encoding u8, index bits
u8, ndim u8, ndim x u32 shape, [u16 codebook size], [u32 nonzero count], data. No pickle: it loads
with struct and numpy alone.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torch import nn

MAGIC = b"SFPK"
VERSION = 1
FLAG_ZLIB = 1
MAX_CODEBOOK = 256
ENCODINGS = ("dense", "sparse", "codebook", "sparse_codebook")
DENSE, SPARSE, CODEBOOK, SPARSE_CODEBOOK = range(4)
# Position in this tuple is the dtype code in the file; append only.
DTYPES = (
    torch.float32, torch.float64, torch.float16, torch.bfloat16,
    torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool,
)
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class PackError(ValueError):
    """A tensor that cannot be packed, or bytes that are not a packed model."""


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Integers in [0, 2**bits) at `bits` bits each (1..8, MSB first), padded to whole bytes."""
    if bits == 0:
        return b""
    v = np.asarray(values, dtype=np.uint8).reshape(-1)
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint8)
    return np.packbits(((v[:, None] >> shifts) & 1).reshape(-1)).tobytes()


def unpack_bits(data: bytes | memoryview, bits: int, count: int) -> np.ndarray:
    """Inverse of pack_bits: `count` uint8 integers."""
    if bits == 0:
        return np.zeros(count, dtype=np.uint8)
    flat = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=count * bits).reshape(count, bits)
    # Left-pad each row to 8 bits so packbits turns it straight back into one byte.
    return np.packbits(np.pad(flat, ((0, 0), (8 - bits, 0))), axis=1).reshape(count)


def _bits_for(k: int) -> int:
    return max(0, math.ceil(math.log2(k))) if k > 0 else 0


def _as_bit_patterns(t: torch.Tensor) -> np.ndarray:
    """The tensor's elements as signed integers of the same width (flat, little-endian)."""
    if t.is_quantized or t.is_sparse or t.layout != torch.strided:
        raise PackError("only dense (strided, non-quantized) tensors can be packed")
    if t.dtype not in DTYPES:
        raise PackError(f"dtype {t.dtype} is not supported; supported: {', '.join(str(d) for d in DTYPES)}")
    t = t.detach().cpu().contiguous()
    if t.is_floating_point():
        t = torch.where(t == 0, torch.zeros((), dtype=t.dtype), t)  # -0.0 -> +0.0: its bits are not zero
    return t.reshape(-1).view(_INT_OF_SIZE[t.element_size()]).numpy().astype(f"<i{t.element_size()}", copy=False)


def _encode(t: torch.Tensor, dense_only: bool = False) -> tuple[int, int, int, int, list[bytes]]:
    """(encoding, index bits, codebook size, nonzero count, data chunks) of the smallest exact encoding."""
    flat = _as_bit_patterns(t)
    n, e = flat.size, flat.itemsize
    if dense_only:
        return DENSE, 0, 0, 0, [flat.tobytes()]
    nz = flat != 0
    nnz = int(nz.sum())
    mask_bytes = (n + 7) // 8
    sizes = {DENSE: n * e}
    if nnz < n:
        sizes[SPARSE] = mask_bytes + nnz * e
    uniq, inv = np.unique(flat, return_inverse=True)
    if len(uniq) <= MAX_CODEBOOK:
        sizes[CODEBOOK] = len(uniq) * e + (n * _bits_for(len(uniq)) + 7) // 8
    if nnz < n:
        uniq_nz, inv_nz = np.unique(flat[nz], return_inverse=True)
        if len(uniq_nz) <= MAX_CODEBOOK:
            sizes[SPARSE_CODEBOOK] = mask_bytes + len(uniq_nz) * e + (nnz * _bits_for(len(uniq_nz)) + 7) // 8
    enc = min(sizes, key=lambda k: (sizes[k], k))
    if enc == DENSE:
        return enc, 0, 0, 0, [flat.tobytes()]
    if enc == SPARSE:
        return enc, 0, 0, nnz, [np.packbits(nz).tobytes(), flat[nz].tobytes()]
    if enc == CODEBOOK:
        b = _bits_for(len(uniq))
        return enc, b, len(uniq), 0, [uniq.tobytes(), pack_bits(inv, b)]
    b = _bits_for(len(uniq_nz))
    return enc, b, len(uniq_nz), nnz, [np.packbits(nz).tobytes(), uniq_nz.tobytes(), pack_bits(inv_nz, b)]


def _pack(state_dict: dict[str, torch.Tensor], dense_only: bool = False) -> tuple[bytes, list[dict[str, Any]]]:
    out = [struct.pack("<I", len(state_dict))]
    rows = []
    for name, t in state_dict.items():
        enc, bits, k, nnz, chunks = _encode(t, dense_only)
        raw = name.encode()
        head = [struct.pack("<H", len(raw)), raw,
                struct.pack("<BBBB", DTYPES.index(t.dtype), enc, bits, t.dim()),
                struct.pack(f"<{t.dim()}I", *t.shape)]
        if enc in (CODEBOOK, SPARSE_CODEBOOK):
            head.append(struct.pack("<H", k))
        if enc in (SPARSE, SPARSE_CODEBOOK):
            head.append(struct.pack("<I", nnz))
        out += head + chunks
        rows.append({
            "name": name, "encoding": ENCODINGS[enc], "bits": bits, "codebook": k,
            "bytes": sum(map(len, chunks)), "dense_bytes": t.numel() * t.element_size(),
        })
    return b"".join(out), rows


def pack_state_dict(state_dict: dict[str, torch.Tensor], *, compress: bool = False) -> bytes:
    """The packed bytes of a state_dict; `compress` adds zlib on top (the raw size is the honest one)."""
    body, _ = _pack(state_dict)
    flags = 0
    if compress:
        body, flags = zlib.compress(body, 9), FLAG_ZLIB
    return MAGIC + struct.pack("<BB", VERSION, flags) + body


def pack_model(model: nn.Module, *, compress: bool = False) -> bytes:
    """The packed bytes of `model.state_dict()`; its length is the model's real file size."""
    return pack_state_dict(model.state_dict(), compress=compress)


def packed_size(model: nn.Module, *, compress: bool = False) -> int:
    return len(pack_model(model, compress=compress))


def packing_report(model_or_state: nn.Module | dict[str, torch.Tensor]) -> dict[str, Any]:
    """Bytes packed (raw and with zlib), the same file with every tensor dense, and each tensor's encoding."""
    sd = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    body, rows = _pack(sd)
    header = len(MAGIC) + 2
    return {
        "packed_bytes": header + len(body),
        "packed_zlib_bytes": header + len(zlib.compress(body, 9)),
        "dense_bytes": header + len(_pack(sd, dense_only=True)[0]),
        "tensors": {r["name"]: {k: v for k, v in r.items() if k != "name"} for r in rows},
    }


class _Reader:
    def __init__(self, data: bytes):
        self.data = memoryview(data)
        self.pos = 0

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise PackError("packed data is truncated")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str) -> tuple:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))


def _decode(r: _Reader, dtype: torch.dtype, enc: int, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    e = torch.empty((), dtype=dtype).element_size()
    idt = np.dtype(f"<i{e}")
    n = math.prod(shape)
    k = r.unpack("<H")[0] if enc in (CODEBOOK, SPARSE_CODEBOOK) else 0
    nnz = r.unpack("<I")[0] if enc in (SPARSE, SPARSE_CODEBOOK) else n
    if enc == DENSE:
        flat = np.frombuffer(r.take(n * e), dtype=idt).copy()
    else:
        mask = None
        if enc in (SPARSE, SPARSE_CODEBOOK):
            mask = np.unpackbits(np.frombuffer(r.take((n + 7) // 8), dtype=np.uint8), count=n).astype(bool)
        if enc == SPARSE:
            values = np.frombuffer(r.take(nnz * e), dtype=idt)
        else:
            book = np.frombuffer(r.take(k * e), dtype=idt)
            idx = unpack_bits(r.take((nnz * bits + 7) // 8), bits, nnz)
            if nnz and int(idx.max()) >= k:
                raise PackError("packed data is corrupt: a codebook index is out of range")
            values = book[idx]
        if mask is None:
            flat = values.copy()
        else:
            if int(mask.sum()) != nnz:
                raise PackError("packed data is corrupt: the bitmask does not match the nonzero count")
            flat = np.zeros(n, dtype=idt)
            flat[mask] = values
    return torch.from_numpy(flat.astype(idt.newbyteorder("="), copy=False)).view(dtype).reshape(shape)


def unpack_state_dict(blob: bytes) -> OrderedDict[str, torch.Tensor]:
    """Inverse of pack_state_dict."""
    if blob[:4] != MAGIC:
        raise PackError("not a packed model (bad magic bytes); write it with compression_ops.packing.pack_model")
    version, flags = struct.unpack("<BB", blob[4:6])
    if version != VERSION:
        raise PackError(f"packed format version {version} is not supported (this code reads {VERSION})")
    body = zlib.decompress(blob[6:]) if flags & FLAG_ZLIB else blob[6:]
    r = _Reader(body)
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for _ in range(r.unpack("<I")[0]):
        name = bytes(r.take(r.unpack("<H")[0])).decode()
        code, enc, bits, ndim = r.unpack("<BBBB")
        if code >= len(DTYPES) or enc >= len(ENCODINGS) or bits > 8:
            raise PackError(f"packed data is corrupt at tensor {name!r}")
        shape = r.unpack(f"<{ndim}I")
        out[name] = _decode(r, DTYPES[code], enc, bits, shape)
    if r.pos != len(body):
        raise PackError(f"packed data has {len(body) - r.pos} trailing bytes")
    return out


def unpack_model(blob: bytes, model_skeleton: nn.Module) -> nn.Module:
    """Load packed weights into a model of the same architecture (strictly); returns that model."""
    model_skeleton.load_state_dict(unpack_state_dict(blob), strict=True)
    return model_skeleton
