"""The Recurrent Memory Transformer around any Hugging Face backbone."""

from rmt.model.config import RMTConfig
from rmt.model.decoder import RecurrentMemoryDecoder, RMTDecoderOutput
from rmt.model.encoder import RecurrentMemoryEncoder, RMTEncoderOutput

__all__ = ["RMTConfig", "RecurrentMemoryDecoder", "RecurrentMemoryEncoder", "RMTDecoderOutput", "RMTEncoderOutput"]
