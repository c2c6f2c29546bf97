"""lbr-ray: Learn Before Represent (LBR) domain embedding models, trained and evaluated on Ray."""
from __future__ import annotations

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "Encoder":  # lazy: importing lbr_ray stays light and Ray-free
        from lbr_ray.model.encoder import Encoder

        return Encoder
    raise AttributeError(name)


__all__ = ["Encoder", "__version__"]
