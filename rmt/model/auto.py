"""An RMT checkpoint as Hugging Face sees it: a config class of its own per architecture,
registered with the Auto classes, so that a checkpoint folder (or hub repository) loads as
the RMT it is, never as a bare backbone with re-initialised weights.

    config.json          {"model_type": "rmt_encoder", "rmt_config": {...RMTConfig...},
                          "backbone_config": {...the backbone's config.json...}, ...}
    model.safetensors    every weight (backbone, memory embeddings, head)

    from rmt import RecurrentMemoryEncoder             # importing a model class registers it
    AutoModel.from_pretrained(folder_or_repo)          # -> RecurrentMemoryEncoder
    AutoModelForCausalLM.from_pretrained(...)          # -> RecurrentMemoryDecoder (rmt_decoder)

Checkpoints written before this layout (the backbone's config.json beside rmt_config.json)
still load through the RMT classes (`read_checkpoint_config`).
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

from rmt.model.config import RMTConfig

LEGACY_CONFIG_NAME = "rmt_config.json"  # the RMT settings of a checkpoint written before model_type
HF_CONFIG_NAME = "config.json"


class RecurrentMemoryConfig(PretrainedConfig):
    """The RMT wrapper's settings (`rmt_config`, an RMTConfig) with the backbone's config
    nested (`backbone_config`, a dict with its own model_type). Kept apart from the top level,
    where PretrainedConfig gives names such as num_labels and pad_token_id meanings of its own."""

    architecture = ""

    def __init__(self, rmt_config: dict | None = None, backbone_config: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        self.rmt_config = dict(rmt_config or {})
        self.backbone_config = dict(backbone_config or {})

    @classmethod
    def of(cls, rmt: RMTConfig, backbone: PretrainedConfig) -> "RecurrentMemoryConfig":
        kind = CONFIG_CLASSES[rmt.architecture]
        return kind(rmt_config=rmt.to_dict(), backbone_config=backbone.to_dict(), architectures=[kind.model_class_name])

    def rmt(self) -> RMTConfig:
        return RMTConfig.from_dict(self.rmt_config)

    def backbone(self) -> PretrainedConfig:
        values = dict(self.backbone_config)
        return AutoConfig.for_model(values.pop("model_type"), **values)


class RecurrentMemoryEncoderConfig(RecurrentMemoryConfig):
    model_type = "rmt_encoder"
    architecture = "encoder"
    model_class_name = "RecurrentMemoryEncoder"


class RecurrentMemoryDecoderConfig(RecurrentMemoryConfig):
    model_type = "rmt_decoder"
    architecture = "decoder"
    model_class_name = "RecurrentMemoryDecoder"


CONFIG_CLASSES = {kind.architecture: kind for kind in (RecurrentMemoryEncoderConfig, RecurrentMemoryDecoderConfig)}
BY_MODEL_TYPE = {kind.model_type: kind for kind in CONFIG_CLASSES.values()}
for _kind in CONFIG_CLASSES.values():
    AutoConfig.register(_kind.model_type, _kind, exist_ok=True)


def checkpoint_configs(path: Path) -> tuple[RMTConfig, PretrainedConfig] | None:
    """The RMT and backbone configs of the folder `path`, or None when it is no RMT
    checkpoint (a backbone's folder, or nothing). Raises on a file that does not parse."""
    if (path / LEGACY_CONFIG_NAME).is_file():
        return RMTConfig.load_file(path / LEGACY_CONFIG_NAME), AutoConfig.from_pretrained(path)
    if not (path / HF_CONFIG_NAME).is_file():
        return None
    values = json.loads((path / HF_CONFIG_NAME).read_text())
    if values.get("model_type") not in BY_MODEL_TYPE:
        return None
    config = BY_MODEL_TYPE[values["model_type"]].from_dict(values)
    return config.rmt(), config.backbone()


def is_rmt_config_file(path: Path) -> bool:
    """Whether a config.json (e.g. one file fetched from the hub) describes an RMT."""
    try:
        return json.loads(Path(path).read_text()).get("model_type") in BY_MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False


def is_checkpoint_folder(path: Path) -> bool:
    """A folder rmt may replace with a checkpoint: empty, or an RMT checkpoint of either
    layout (never a backbone's folder, whose config.json is not an RMT's)."""
    if not path.is_dir() or path.is_symlink():
        return False
    return (not any(path.iterdir()) or (path / LEGACY_CONFIG_NAME).is_file()
            or is_rmt_config_file(path / HF_CONFIG_NAME))
