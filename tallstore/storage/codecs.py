"""The codec chains the archive uses: Zarr v3 spec codecs only (blosc, zstd, crc32c).

Weights are stored as their bit patterns, so Blosc's shuffle groups the bytes of equal
significance (sign/exponent bytes compress well) before the compressor. Two presets:
``fast`` (the default, LZ4HC) decodes faster than ``compact`` (zstd), which makes archives a
little smaller; loading a task is bound by that decode (``benchmarks/`` measures both).
Masks are packed bits, which zstd's entropy coder takes to within a few percent of the mask
entropy. Masks use zstd's btultra levels (16+): at densities below ~0.2 the faster levels stay ~7% above the entropy
(byte-wise Huffman), level 16 within ~2.5%; masks are 1/32 of fp32 weights, so the slower
compression costs little pack time, and decompression is as fast.
"""

from __future__ import annotations

from dataclasses import dataclass

from zarr.abc.codec import BytesBytesCodec
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from ..errors import PlanError


@dataclass(frozen=True)
class Codecs:
    """Compression settings for an archive: a value recorded in each array's metadata."""

    weight_cname: str = "lz4hc"
    weight_level: int = 5
    weight_shuffle: str = "shuffle"
    mask_level: int = 16

    def weights(self, itemsize: int) -> list[BytesBytesCodec]:
        """Codecs for weight bit patterns of ``itemsize`` bytes."""
        return [
            BloscCodec(
                cname=self.weight_cname,
                clevel=self.weight_level,
                shuffle=self.weight_shuffle if itemsize > 1 else "noshuffle",
                typesize=itemsize,
            ),
            Crc32cCodec(),
        ]

    def masks(self) -> list[BytesBytesCodec]:
        """Codecs for packed mask bytes."""
        return [ZstdCodec(level=self.mask_level), Crc32cCodec()]


PRESETS = {
    "fast": Codecs(),
    "compact": Codecs(weight_cname="zstd", weight_level=5),
}


def preset(name: str) -> Codecs:
    """The named preset (``fast`` or ``compact``); an unknown name is a clear error."""
    try:
        return PRESETS[name]
    except KeyError:
        raise PlanError(f"unknown codec preset {name!r}; choose one of {', '.join(PRESETS)}") from None
