"""Agreement between two judges."""
from __future__ import annotations

import numpy as np


def cohen_kappa(a: np.ndarray, b: np.ndarray) -> float:
    """Agreement beyond chance between two binary label vectors."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    po = float((a == b).mean())
    pe = float(a.mean() * b.mean() + (1 - a.mean()) * (1 - b.mean()))
    return 1.0 if pe == 1 else (po - pe) / (1 - pe)
