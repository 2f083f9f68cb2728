"""Input validation shared by the COCO loader, the converters and the splitter.

Every defect is either a :class:`DataError` whose message names the file and the item, or -- for box defects only
(outside the image, zero area) -- repaired and counted by :class:`BoxRepairs`, which logs one summary line per file.
``strict=True`` turns box defects into errors too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from sdconet.utils.logging import get_logger

logger = get_logger(__name__)


class DataError(ValueError):
    """Bad dataset input; the message names the file and the offending item."""


@dataclass
class BoxRepairs:
    """Repairs box defects of one source file, counts them, or raises in strict mode.

    Boxes are xyxy in the image's pixel frame ``[0, width] x [0, height]``.
    """

    source: str
    strict: bool = False
    clipped: int = 0  # partly outside the image: clipped to it
    dropped_outside: int = 0  # entirely outside the image
    dropped_zero_area: int = 0  # x2 <= x1 or y2 <= y1

    @property
    def total(self) -> int:
        return self.clipped + self.dropped_outside + self.dropped_zero_area

    def repair(self, box: Sequence[float], width: float, height: float, item: str) -> Optional[tuple[float, ...]]:
        """Return the box clipped to the image, or None when it must be dropped.

        A non-finite coordinate is malformed input, never repaired.
        """
        x1, y1, x2, y2 = (float(v) for v in box)
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            raise DataError(f"{self.source}: {item}: non-finite box coordinates {list(box)}")
        if x2 <= x1 or y2 <= y1:
            self._defect(f"{item}: box {_fmt(box)} has zero area")
            self.dropped_zero_area += 1
            return None
        cx1, cy1 = min(max(x1, 0.0), width), min(max(y1, 0.0), height)
        cx2, cy2 = min(max(x2, 0.0), width), min(max(y2, 0.0), height)
        if (cx1, cy1, cx2, cy2) == (x1, y1, x2, y2):
            return x1, y1, x2, y2
        if cx2 <= cx1 or cy2 <= cy1:
            self._defect(f"{item}: box {_fmt(box)} lies outside the {width:g}x{height:g} image")
            self.dropped_outside += 1
            return None
        self._defect(f"{item}: box {_fmt(box)} extends outside the {width:g}x{height:g} image")
        self.clipped += 1
        return cx1, cy1, cx2, cy2

    def _defect(self, message: str) -> None:
        if self.strict:
            raise DataError(f"{self.source}: {message} (strict mode)")

    def log(self) -> None:
        if self.total:
            logger.warning("%s: repaired box defects: %d clipped to the image, %d dropped (outside the image), "
                           "%d dropped (zero area); use --strict / data.strict=true to make them errors",
                           self.source, self.clipped, self.dropped_outside, self.dropped_zero_area)

    def as_dict(self) -> dict[str, int]:
        return {"clipped": self.clipped, "dropped_outside": self.dropped_outside,
                "dropped_zero_area": self.dropped_zero_area}


def _fmt(box: Sequence[float]) -> str:
    return "[" + ", ".join(f"{float(v):g}" for v in box) + "]"
