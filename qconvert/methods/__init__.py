"""Ways to store a weight, by name: one module each behind `methods.base.Method`; `driver` runs them."""

from qconvert.methods.base import Method
from qconvert.methods.float import Float
from qconvert.methods.kmeans import KMeans
from qconvert.methods.linear import Linear

METHODS: dict[str, Method] = {m.name: m for m in (KMeans(), Linear(), Float())}  # type: ignore[misc]
