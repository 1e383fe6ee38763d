"""How a region is removed from a model: at the granularity it was selected in (docs/methods.md §3.4).

A region names its granularity in `meta["granularity"]` (a key of `methods.GRANULARITIES`): `Weights` here,
`Neurons` and `Layers` in methods/neuron.py and methods/layer.py. The granularity also decides what a fair random
control is.
"""
from __future__ import annotations

from ..hooks import zeroed_weights
from ..regions import PackedRegion, Region, random_like
from . import granularity as registered


class Granularity:
    """The unit a region was selected in: how it is removed and how its random control is drawn."""

    name = ""

    def ablate(self, model, region: Region, layer_alpha: float = 0.0):
        """Context manager: the model without `region` inside, restored bit-exactly on exit."""
        raise NotImplementedError

    def random_control(self, model, region: Region, seed: int, mode: str = "per_matrix_matched") -> Region:
        """A random region of the same size at this granularity."""
        raise NotImplementedError

    def units_summary(self, region: Region) -> dict:
        """Counts of the region's native units for summary tables ({} when the unit is the weight)."""
        return {}


class Weights(Granularity):
    """Individual weight entries (SNIP, Wanda, NLSR's base projection, ESI): zeroed; control = the same count per
    matrix (`regions.random_like`)."""

    name = "weights"

    def ablate(self, model, region: Region, layer_alpha: float = 0.0):
        return zeroed_weights(model, region.masks)

    def random_control(self, model, region: Region, seed: int, mode: str = "per_matrix_matched") -> Region:
        return random_like(region, seed, mode)


def granularity_of(region: Region | PackedRegion) -> Granularity:
    """The region's granularity from its meta. A region without one is a plain weight region (ESI, random masks),
    unless it holds native units: then it was saved before regions carried their granularity."""
    name = region.meta.get("granularity")
    if name is None:
        if region.units:
            raise ValueError("region has native units but no meta['granularity']; re-run the identify stage")
        return Weights()
    return registered(name)


def ablation(model, region: Region, layer_alpha: float = 0.0):
    """Context manager that removes `region` from `model` at the region's own granularity (`layer_alpha` scales
    layer regions; 0 = the blocks' projections are off)."""
    return granularity_of(region).ablate(model, region, layer_alpha)


def random_control(model, region: Region, seed: int, mode: str = "per_matrix_matched") -> Region:
    """A random region of the same size and granularity as `region` (docs/methods.md §3.4)."""
    return granularity_of(region).random_control(model, region, seed, mode)
