"""What the workflow assumes about an image's modality, in one place.

Mammography (DICOM Modality ``MG``, and files that name no modality, as the first importers wrote them):
the image is mirrored so the chest wall is on the left (checked from the pixels), image labels may come
from BI-RADS, the foreground is the breast, the views are CC / MLO ... Any other modality (a chest ``CR``,
``DX``, ...) imported with ``mammo import --non-mg warn`` goes through the same read, dissection, query
and report with none of these: it keeps the orientation it was stored in, BI-RADS means nothing for it,
its foreground is called the body and one image an image (not a mammogram). The foreground rule itself (Otsu on the windowed image, largest
component, holes filled) holds for both: the imaged part against the detector's empty field.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Modality:
    code: str                # DICOM Modality
    name: str
    region: str              # what the foreground is: "breast", "body"
    chest_wall_left: bool    # mirror to the normalised mammography orientation
    birads: bool             # image-level labels may come from BI-RADS
    subject: str = "image"   # what a reader calls one image: "mammogram", "image"

    def region_intensity(self, what: str) -> str:
        """``"breast intensity (median)"`` for ``what="median"``: the reader's wording of a foreground feature."""
        return f"{self.region} intensity ({what})"


MAMMOGRAPHY = Modality("MG", "mammography", "breast", chest_wall_left=True, birads=True, subject="mammogram")


def modality_of(code: str | None) -> Modality:
    """The assumptions for a DICOM Modality value (``None``/empty: mammography)."""
    code = (code or "").strip().upper()
    if code in ("", "MG"):
        return MAMMOGRAPHY
    return Modality(code, code, "body", chest_wall_left=False, birads=False)


__all__ = ["Modality", "MAMMOGRAPHY", "modality_of"]
