"""The recurrence shared by the encoder and decoder RMT: memory, segment loop, truncated and
memory-efficient back-propagation through time, streaming, save/load.

Shapes: B examples in the batch, A of them active in a step, m memory tokens, H the
backbone's embedding width, L text tokens per segment, S positions per segment.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import PretrainedConfig

from rmt.model.auto import (HF_CONFIG_NAME, RecurrentMemoryConfig, checkpoint_configs, is_checkpoint_folder,
                            is_rmt_config_file)
from rmt.model.config import RMTConfig
from rmt.model.segments import Alignment, SegmentStep, first_tokens, num_segments_for, stream_segments
from rmt.utils import atomic_directory, exists

WEIGHTS_NAME = "model.safetensors"


def read_checkpoint_config(path: str | Path) -> RMTConfig:
    """The RMTConfig of the checkpoint folder `path`, once its files are known to be whole:
    the RMT config, the backbone's config and the weights' header all parse. A missing,
    truncated or garbled file is one problem for the user, whatever the parser says."""
    return _read_checkpoint(Path(path))[0]


def _read_checkpoint(path: Path) -> tuple[RMTConfig, PretrainedConfig]:
    try:
        configs = checkpoint_configs(path)
        if configs is not None:
            with safe_open(path / WEIGHTS_NAME, framework="pt") as weights:
                weights.keys()
    except Exception as error:  # noqa: BLE001 - see read_checkpoint_config
        raise ValueError(f"The checkpoint {path} is damaged or incomplete ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else 'unreadable'}): train its stage again, "
                         "or give another checkpoint") from None
    if configs is None:
        raise FileNotFoundError(f"{path} is not an RMT checkpoint (its {HF_CONFIG_NAME} is missing or not an RMT's): "
                                "give a stage's best/ folder")
    return configs


def _checkpoint_folder(name_or_path: str | Path, hub: dict) -> Path | None:
    """The local folder of the RMT checkpoint `name_or_path` names: the folder itself, or a
    hub repository's snapshot (fetched, or from the cache when offline); None when it names
    no RMT checkpoint (a backbone, or nothing: the backbone loader then says what is wrong)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path if is_checkpoint_folder(path) and any(path.iterdir()) else None
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        config_file = hf_hub_download(str(name_or_path), HF_CONFIG_NAME, **hub)
    except Exception:  # noqa: BLE001 - not a repository the hub (or its cache) has: no checkpoint here
        return None
    if not is_rmt_config_file(Path(config_file)):
        return None
    return Path(snapshot_download(str(name_or_path), **{k: v for k, v in hub.items() if k != "subfolder"}))


# Options of the Auto classes' from_pretrained: where to fetch a checkpoint from the hub ...
HUB_OPTIONS = ("revision", "cache_dir", "token", "local_files_only", "force_download", "proxies")
# ... and ones that mean nothing for an RMT checkpoint (its own code is this package).
AUTO_CLASS_OPTIONS = ("trust_remote_code", "adapter_kwargs", "_from_auto", "_commit_hash", "subfolder")

# Loading a backbone never silently downcasts: the paper trains in full precision, and
# transformers 5 otherwise keeps a checkpoint's own dtype (often bf16).
DEFAULT_BACKBONE_KWARGS = {"dtype": torch.float32}
# Settings that change the weights' shapes: a checkpoint cannot be loaded with other values.
STRUCTURAL_FIELDS = ("architecture", "num_memory_tokens", "num_labels")


@dataclass
class SegmentResult:
    """What one segment step hands back besides the next memory. Only small tensors are kept
    for every step; large ones (hidden states) only where the caller needs them."""

    loss_sum: Tensor | None = None  # () summed loss of this step's rows
    logits: Tensor | None = None
    last_hidden_state: Tensor | None = None
    attentions: tuple[Tensor, ...] | None = None


def _takes_inputs_embeds(module: nn.Module) -> bool:
    return "inputs_embeds" in inspect.signature(module.forward).parameters


def position_limit(backbone: nn.Module) -> int | None:
    """How many positions one forward call of the backbone can take, if it has a limit."""
    limit = getattr(backbone.config, "max_position_embeddings", None)
    if limit is None:
        return None
    for name, module in backbone.named_modules():
        # RoBERTa-style tables start counting after the padding index.
        if name.endswith("position_embeddings") and isinstance(module, nn.Embedding) and exists(module.padding_idx):
            return limit - module.padding_idx - 1
    return limit


def _full_batch_tensors(batch: int, length: int, count: int, device: torch.device) -> tuple[Tensor, Tensor, list]:
    """rows (B,) and lengths (B,) of a full-batch step, and for each of the `count` steps its
    (segment index, count), each (B,): views built once, so that a step of a long stream only
    picks them from a list instead of indexing a tensor (two dispatches per segment)."""
    positions = torch.stack([torch.arange(count, device=device), torch.full((count,), count, device=device)])
    per_step = positions[..., None].expand(2, count, batch)
    return (torch.arange(batch, device=device), torch.full((batch,), length, device=device),
            list(zip(per_step[0].unbind(0), per_step[1].unbind(0))))


class RecurrentMemoryModel(nn.Module):
    """A Hugging Face backbone that reads a long input segment by segment, carrying m memory
    vectors from each segment to the next. Subclasses define one segment's layout."""

    architecture: str
    align: Alignment
    auto_model_class: Any

    def __init__(self, *, backbone: nn.Module, config: RMTConfig):
        super().__init__()
        if config.architecture != self.architecture:
            raise ValueError(
                f"{type(self).__name__} needs architecture='{self.architecture}', the config says "
                f"'{config.architecture}'"
            )
        self.config = config
        self.backbone = backbone
        self._check_backbone()
        # New trainable embeddings, like m extra vocabulary rows, initialised as the backbone
        # initialises its own embeddings.
        std = getattr(backbone.config, "initializer_range", 0.02)
        self.memory_embeddings = nn.Parameter(torch.randn(config.num_memory_tokens, self.embedding_dim) * std)  # (m, H)
        self._shape_cache: dict[tuple, Any] = {}  # see _cached

    # ---------------------------------------------------------------- checks
    @property
    def backbone_body(self) -> nn.Module:
        """The module that takes inputs_embeds and returns last_hidden_state."""
        return self.backbone

    @property
    def embedding_dim(self) -> int:
        return self.backbone.get_input_embeddings().embedding_dim

    @property
    def device(self) -> torch.device:
        return self.memory_embeddings.device

    def _check_backbone(self) -> None:
        name = type(self.backbone).__name__
        if not (hasattr(self.backbone, "config") and hasattr(self.backbone, "get_input_embeddings")):
            raise TypeError(f"The backbone {name} is not a Hugging Face model (no config / get_input_embeddings)")
        if not _takes_inputs_embeds(self.backbone_body):
            raise TypeError(
                f"The backbone {name} takes no inputs_embeds: RMT feeds memory to the backbone as embeddings. "
                "Use a Hugging Face model whose forward() accepts inputs_embeds."
            )
        limit = position_limit(self.backbone)
        needed = self.config.segment_positions
        if exists(limit) and needed > limit:
            fixed = self.config.memory_positions_per_segment + self.config.num_special_tokens
            raise ValueError(
                f"A segment needs {needed} positions ({self.config.segment_length} tokens + "
                f"{self.config.memory_positions_per_segment} memory + {self.config.num_special_tokens} special) "
                f"but the backbone {name} has {limit}: set segment_length to at most {limit - fixed}"
            )

    # ---------------------------------------------------------------- recurrence
    def initial_memory(self, batch_size: int) -> Tensor:
        return self.memory_embeddings[None].expand(batch_size, -1, -1)  # (B, m, H)

    def _check_memory(self, memory: Tensor, batch_size: int) -> Tensor:
        """A given starting memory: (B, m, H), as memory_states hands it out."""
        expected = (batch_size, self.config.num_memory_tokens, self.embedding_dim)
        if tuple(memory.shape) != expected:
            raise ValueError(f"memory must be (batch, memory tokens, hidden) = {expected}, got {tuple(memory.shape)}: "
                             "pass a memory state of this model (output_memory_states) for each input")
        return memory.to(self.device, self.memory_embeddings.dtype)

    def read_memory(self, input_ids, *, memory: Tensor | None = None) -> Tensor:
        """(B, m, H) the memory after reading `input_ids` (from `memory`, else the initial one;
        as forward() reads them, so cut to max_segments). An input that a second one is to
        continue holds a whole number of segments: the encoder aligns its segments from the right."""
        return self(input_ids, memory=memory, output_memory_states=True).memory_states[-1]

    def _memory_cut(self, step: SegmentStep) -> Tensor | None:
        """(A,) True where this segment's memory input is detached (truncated BPTT): only the
        memory inputs of each example's last `bptt_depth` segments carry gradients. None when
        no row's memory input is cut."""
        depth = self.config.bptt_depth
        if depth < 0 or not torch.is_grad_enabled():
            return None
        if step.segments_after[1] < depth:  # decided on the host: no device sync per step
            return None
        return step.segment_index < step.num_segments - depth

    def _out_of_reach(self, step: SegmentStep) -> bool:
        """True when no gradient of the loss can reach this step (truncated BPTT): every row's
        next memory input is cut too, and the segments carry no loss of their own. Such a
        segment may run without a graph, so a long truncated example costs a forward pass
        before its window. (The memory embeddings then get no gradient, None rather than
        zeros: an optimizer leaves them as they are for that step.)"""
        depth = self.config.bptt_depth
        if depth < 0 or not torch.is_grad_enabled() or self._every_segment_scored():
            return False
        return step.segments_after[0] > depth  # every row's next segment is before its window

    def _every_segment_scored(self) -> bool:
        """Whether training puts a loss on every segment, not only on each example's last."""
        raise NotImplementedError

    def _segment_forward(self, memory: Tensor, step: SegmentStep, **options) -> tuple[Tensor, SegmentResult]:
        """(A, m, H) memory in -> (A, m, H) memory out, for the active rows of one step."""
        raise NotImplementedError

    def _step(
        self, memory: Tensor, step: SegmentStep, *, graph: bool = True, **options
    ) -> tuple[Tensor, SegmentResult]:
        """(B, m, H) -> (B, m, H): rows without a segment in this step keep their memory.
        graph=False: the segment runs without an autograd graph (no gradient reaches it)."""
        every_row = len(step.rows) == memory.shape[0]
        memory_in = memory if every_row else memory[step.rows]
        cut = self._memory_cut(step) if graph else None  # without a graph there is nothing to cut
        if exists(cut):
            memory_in = torch.where(cut[:, None, None], memory_in.detach(), memory_in)
        with nullcontext() if graph else torch.no_grad():
            new_memory, result = self._segment_forward(memory_in, step, **options)
        if every_row:
            return new_memory, result
        return memory.to(new_memory.dtype).index_copy(0, step.rows, new_memory), result

    def _recur(
        self, steps: list[SegmentStep], batch_size: int, *, memory: Tensor | None = None,
        output_memory_states: bool = False, **options
    ) -> tuple[list[SegmentResult], tuple[Tensor, ...] | None]:
        memory = self.initial_memory(batch_size) if memory is None else self._check_memory(memory, batch_size)
        memory_states = [memory]
        results = []
        # Segment-level recomputation: each step keeps only its inputs (the (B, m, H) memory
        # and the token ids); its activations are rebuilt, with the same dropout masks, when
        # the backward pass reaches it. Losses are computed inside the step so that nothing
        # larger than a scalar and the memory crosses a step boundary. The last step keeps its
        # activations: the backward pass starts there, so rebuilding them would cost a forward
        # pass and save no memory (the backward pass of any one segment holds them anyway).
        recompute = self.config.memory_efficient_backprop and torch.is_grad_enabled()
        # What a caller asks to see (memory states, attention maps) keeps its graph, so that a
        # loss of its own can still differentiate through it.
        outputs_asked = output_memory_states or options.get("output_attentions", False)
        for index, step in enumerate(steps):
            graph = outputs_asked or not self._out_of_reach(step)
            if recompute and index < len(steps) - 1:
                memory, result = checkpoint(self._step, memory, step, use_reentrant=False, graph=graph, **options)
            else:
                memory, result = self._step(memory, step, graph=graph, **options)
            results.append(result)
            if output_memory_states:
                memory_states.append(memory)
        return results, (tuple(memory_states) if output_memory_states else None)

    @contextmanager
    def _attention_for(self, output_attentions: bool):
        """Attention weights exist only in the eager implementation: switch to it for the call."""
        current = self.backbone.config._attn_implementation
        if not output_attentions or current == "eager":
            yield
            return
        self.backbone.set_attn_implementation("eager")
        try:
            yield
        finally:
            self.backbone.set_attn_implementation(current)

    # ---------------------------------------------------------------- streaming
    def _cached(self, key: tuple, build: Callable[[], Any]) -> Any:
        """What `build()` returns, kept for the next call with the same key: the fixed tensors
        of a segment's shape, which a stream would otherwise rebuild at every segment (a few
        small operations each, a measurable share of a small model's step). Built outside
        inference mode, so that training can use them too."""
        value = self._shape_cache.get(key)
        if value is None:
            if len(self._shape_cache) >= 64:  # training meets many shapes: keep recent ones only
                self._shape_cache.clear()
            with torch.inference_mode(False):
                value = self._shape_cache[key] = build()
        return value

    def _full_batch_step(self, tokens: Tensor, index: int, count: int, token_labels: Tensor | None = None) -> SegmentStep:
        """A step in which every row of the batch has a segment of the same length."""
        batch, length = tokens.shape
        if length < self.config.segment_length:  # a stream's one short segment
            tokens = nn.functional.pad(tokens, (0, self.config.segment_length - length))
        rows, lengths, positions = self._cached(("full batch", batch, length, count, tokens.device),
                                                lambda: _full_batch_tensors(batch, length, count, tokens.device))
        segment_index, num_segments = positions[index]
        return SegmentStep(
            rows=rows,
            tokens=tokens,
            lengths=lengths,
            segment_index=segment_index,
            num_segments=num_segments,
            token_labels=token_labels,
            length=length,
            segments_after=(count - 1 - index, count - 1 - index),
        )

    def _tokens_read(self, num_tokens: int) -> int:
        """How many tokens of an input are read, in `forward` and `stream` alike: all, or the
        first max_segments segments' worth (the paper's rule: the beginning is kept)."""
        if self.config.max_segments is None:
            return num_tokens
        return min(num_tokens, self.config.max_segments * self.config.segment_length)

    def _cut_to_max_segments(self, rows: list[Tensor]) -> list[Tensor]:
        """The part of each example `forward` reads. Cut before anything is derived from the
        tokens (the decoder's next-token targets), so the model sees exactly the shorter text."""
        return [row[: self._tokens_read(len(row))] for row in rows]

    def _stream_segments(self, chunks: Iterable, num_tokens: int) -> Iterator[Tensor]:
        used = self._tokens_read(num_tokens)
        return stream_segments(
            first_tokens(chunks, used) if used < num_tokens else chunks, num_tokens=used,
            segment_length=self.config.segment_length, align=self.align,
        )

    def _num_stream_segments(self, num_tokens: int) -> int:
        return num_segments_for(self._tokens_read(num_tokens), self.config.segment_length)

    # ---------------------------------------------------------------- save / load
    def save_pretrained(self, directory: str | Path) -> None:
        """The config (config.json: the RMT's, with the backbone's nested; model_type
        rmt_encoder or rmt_decoder) and every weight (model.safetensors) in one directory,
        written atomically: a Hugging Face model folder that the Auto classes load."""
        with atomic_directory(directory, ours=is_checkpoint_folder, kind="an RMT checkpoint") as staging:
            self.save_into(staging)

    def save_into(self, directory: Path) -> None:
        """The checkpoint's files, written into an existing directory (for callers that put
        more beside them, such as a tokenizer or training state, in one atomic write)."""
        RecurrentMemoryConfig.of(self.config, self.backbone.config).save_pretrained(directory)
        # save_model drops tied duplicates (GPT-2's lm_head is its input embedding).
        save_model(self, str(Path(directory) / WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        backbone_kwargs: dict | None = None,
        config: PretrainedConfig | None = None,
        **settings,
    ) -> "RecurrentMemoryModel":
        """An RMT checkpoint written by save_pretrained (a local folder or a Hugging Face hub
        repository), or a backbone to wrap (a hub id or a local folder). `settings` are
        RMTConfig fields; for a checkpoint only those that keep the weights' shapes may
        change (segment_length, bptt_depth, ...). The Auto classes call this with the
        `config` they read and their hub options (revision, cache_dir, ...), which fetch the
        checkpoint. Like Hugging Face models, the result is in eval mode."""
        hub = {name: settings.pop(name) for name in HUB_OPTIONS if name in settings}
        settings = {name: value for name, value in settings.items() if name not in AUTO_CLASS_OPTIONS}
        checkpoint = _checkpoint_folder(name_or_path, hub)
        if checkpoint is not None:
            return cls._from_checkpoint(checkpoint, settings)
        backbone = cls._load_backbone(str(name_or_path), {**DEFAULT_BACKBONE_KWARGS, **(backbone_kwargs or {})})
        config = RMTConfig(
            architecture=cls.architecture,
            backbone=str(name_or_path),
            **{**cls._settings_from_backbone(str(name_or_path)), **settings},
        )
        return cls(backbone=backbone, config=config).eval()

    @classmethod
    def _settings_from_backbone(cls, name_or_path: str) -> dict:
        """Config values a backbone implies (the encoder reads its tokenizer's special ids)."""
        return {}

    @classmethod
    def _load_backbone(cls, name_or_path: str, kwargs: dict) -> nn.Module:
        try:
            return cls.auto_model_class.from_pretrained(name_or_path, **kwargs)
        except OSError as error:
            raise OSError(
                f"Could not load the backbone '{name_or_path}': it is neither an RMT checkpoint "
                "nor a model directory, and the Hugging Face hub did not provide it (offline, or a wrong id). "
                "Pass a local directory, or download the model once with network access."
            ) from error

    @classmethod
    def _from_checkpoint(cls, path: Path, settings: dict) -> "RecurrentMemoryModel":
        saved, backbone_config = _read_checkpoint(path)
        if saved.architecture != cls.architecture:
            other = "RecurrentMemoryEncoder" if saved.architecture == "encoder" else "RecurrentMemoryDecoder"
            raise ValueError(f"{path} holds a {saved.architecture} RMT: load it with {other}.from_pretrained")
        conflicts = {
            name: (getattr(saved, name), value)
            for name, value in settings.items()
            if name in STRUCTURAL_FIELDS and getattr(saved, name) != value
        }
        if conflicts:
            detail = ", ".join(f"{name}: checkpoint {old!r}, asked {new!r}" for name, (old, new) in conflicts.items())
            raise ValueError(f"The checkpoint {path} does not match the requested config ({detail}): these change the weights")
        backbone = cls.auto_model_class.from_config(backbone_config)
        model = cls(backbone=backbone, config=saved.replace(**settings))
        try:
            load_model(model, str(path / WEIGHTS_NAME), strict=True)
        except RuntimeError as error:  # missing names or shapes other than the configs describe
            raise ValueError(f"The weights in {path / WEIGHTS_NAME} do not match its config files: {error}") from None
        return model.eval()
