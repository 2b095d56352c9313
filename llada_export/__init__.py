"""llada-export: deployment compiler for LLaDA-V with LLaDA-FastV visual-token pruning."""

__version__ = "0.1.0"

from .graphs.anyres import visual_token_count  # noqa: E402

__all__ = ["__version__", "visual_token_count"]
