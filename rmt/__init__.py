"""rmt: a reproducibility pipeline for the Recurrent Memory Transformer.

The model library lives in `rmt.model`; the `rmt` command in `rmt.cli`. The model classes
load on first use, so that the CLI and the workflow's configuration checks start without
importing torch.
"""

__version__ = "0.1.0"

__all__ = ["RMTConfig", "RecurrentMemoryDecoder", "RecurrentMemoryEncoder", "__version__"]


def __getattr__(name: str):
    if name in __all__:
        import rmt.model

        return getattr(rmt.model, name)
    raise AttributeError(f"module 'rmt' has no attribute {name!r}")
