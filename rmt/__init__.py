"""rmt: a reproducibility pipeline for the Recurrent Memory Transformer.

The model library lives in `rmt.model`; the `rmt` command in `rmt.cli`.
"""

from rmt.model import (
    RMTConfig,
    RecurrentMemoryDecoder,
    RecurrentMemoryEncoder,
)

__version__ = "0.1.0"

__all__ = ["RMTConfig", "RecurrentMemoryDecoder", "RecurrentMemoryEncoder", "__version__"]
