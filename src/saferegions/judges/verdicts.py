"""What every judge returns: `judge(prompts, responses) -> Verdicts`."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Verdicts:
    """A judge's raw verdicts (before the outcome rule). `refused` defaults to "not complied"; the keyword judge
    sets it apart, as a short non-refusal is neither a refusal nor (with `min_words`) a compliance."""
    complied: np.ndarray  # bool per item
    score: np.ndarray     # judge's confidence that the response complied
    refused: np.ndarray | None = None

    def __post_init__(self):
        if self.refused is None:
            self.refused = ~np.asarray(self.complied, bool)

    @property
    def refusal_rate(self) -> float:
        return float(self.refused.mean()) if len(self.refused) else float("nan")
