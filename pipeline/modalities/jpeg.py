"""A JPEG's structure read without decoding it: what a decode task needs to know before it
ships the encoded bytes to a GPU decoder (pipeline.modalities.image.stage_image).

One pass over the markers: the frame header (size, components, baseline or progressive),
Adobe's colour transform, and whether the file reaches its end-of-image marker, which a
truncated file never does (inside entropy-coded data a 0xFF byte is always followed by 0x00
or a restart marker, so the first other marker after a scan is a real one). Costs a few
microseconds per image: the scans are skipped with one regular-expression search each.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Start-of-frame markers (C4 DHT, C8 JPG and CC DAC are not frames)
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_PROGRESSIVE = {0xC2, 0xC6, 0xCA, 0xCE}
# After a scan: the first 0xFF not followed by 0x00 (stuffing), a restart marker or another 0xFF (fill)
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


@dataclass(frozen=True)
class JpegHeader:
    """sof: the frame's marker (0xC0 baseline, 0xC1 extended, 0xC2 progressive, ...);
    adobe_transform: the Adobe APP14 colour transform (None without that segment);
    complete: the end-of-image marker was reached;
    rgb_ids: three components named 'R', 'G', 'B' and no JFIF segment, which libjpeg reads as
    untransformed RGB (a decoder that assumes YCbCr would get other colours)."""

    width: int
    height: int
    components: int
    precision: int
    sof: int
    adobe_transform: int | None
    complete: bool
    rgb_ids: bool = False

    @property
    def progressive(self) -> bool:
        return self.sof in _PROGRESSIVE

    @property
    def gpu_decodable(self) -> bool:
        """What nvJPEG decodes to the same colours as libjpeg: 8-bit Huffman-coded baseline,
        extended or progressive frames, grey or YCbCr (not CMYK/YCCK, not Adobe's
        untransformed RGB), and a whole file."""
        ycc = self.components == 1 or (self.components == 3 and self.adobe_transform != 0 and not self.rgb_ids)
        return self.complete and self.sof in (0xC0, 0xC1, 0xC2) and self.precision == 8 and ycc


def read_jpeg_header(data: bytes, frame_only: bool = False) -> JpegHeader | None:
    """JPEG bytes -> their JpegHeader; None when they are not a JPEG or their structure is
    broken before a frame header is found (the caller decodes those on the CPU, which reports
    the error as it always has). frame_only: stop at the frame header (its size is all that is
    wanted; ``complete`` is then False)."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    i = 2
    frame = None  # (width, height, components, precision, sof)
    adobe = None
    jfif = False
    ids = b""
    complete = False
    while i < n:
        if data[i] != 0xFF:
            break  # garbage where a marker belongs
        while i < n and data[i] == 0xFF:  # fill bytes
            i += 1
        if i >= n:
            break
        m = data[i]
        i += 1
        if m == 0xD9:
            complete = True
            break
        if 0xD0 <= m <= 0xD7 or m == 0x01:  # standalone markers
            continue
        if i + 2 > n:
            break
        seglen = (data[i] << 8) | data[i + 1]
        if seglen < 2 or i + seglen > n:
            break
        seg = data[i + 2:i + seglen]
        if m in _SOF and len(seg) >= 6 and frame is None:
            frame = ((seg[3] << 8) | seg[4], (seg[1] << 8) | seg[2], seg[5], seg[0], m)
            ids = bytes(seg[6:6 + 3 * seg[5]:3])
            if frame_only:
                break
        elif m == 0xE0 and seg[:5] == b"JFIF\x00":
            jfif = True
        elif m == 0xEE and seg[:5] == b"Adobe" and len(seg) >= 12:
            adobe = seg[11]
        i += seglen
        if m == 0xDA:  # a scan: its entropy-coded data runs to the next real marker
            found = _NEXT_MARKER.search(data, i)
            if found is None:
                break
            i = found.start()
    if frame is None:
        return None
    w, h, comps, precision, sof = frame
    return JpegHeader(w, h, comps, precision, sof, adobe, complete, rgb_ids=ids == b"RGB" and not jfif)
