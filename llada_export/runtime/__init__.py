"""The runtime: :class:`~.pipeline.Pipeline` (vision -> stage A -> stage B or the prefix cache, with
the official sampler of :mod:`llada_export.sampler`) and the engines' denoiser. It imports nothing
from ``exporter/``: a serving host needs only the contract layer, the backends and this package."""
