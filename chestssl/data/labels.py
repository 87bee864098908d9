"""Label definitions shared by the CT and the radiograph data."""

from __future__ import annotations

#: Lowest LIDC malignancy rating (1-5) counted as malignant: 4, "moderately suspicious"
#: (seed 000 and the linear probe of :mod:`chestssl.eval.linear_probe` use the same cut).
MALIGNANT_MIN_RATING = 4.0
