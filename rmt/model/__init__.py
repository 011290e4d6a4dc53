"""The Recurrent Memory Transformer around any Hugging Face backbone.

`RMTConfig` is plain Python; the model classes load torch on first use, so that settings
and configuration checks that only need the config start without it.
"""

from rmt.model.config import RMTConfig

__all__ = ["RMTConfig", "RecurrentMemoryDecoder", "RecurrentMemoryEncoder", "RMTDecoderOutput", "RMTEncoderOutput"]


def __getattr__(name: str):
    if name in ("RecurrentMemoryDecoder", "RMTDecoderOutput"):
        from rmt.model import decoder

        return getattr(decoder, name)
    if name in ("RecurrentMemoryEncoder", "RMTEncoderOutput"):
        from rmt.model import encoder

        return getattr(encoder, name)
    raise AttributeError(f"module 'rmt.model' has no attribute {name!r}")
