"""The paper's published figures (Bulatov et al. 2023), drawn beside ours in the report.

Accuracy (%) of models trained with the curriculum (7 segments for Memorize and Detect &
Memorize, 6 for Reasoning), read off Figure 1 (about +-0.5 points).
"""

SEGMENTS = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)

ACCURACY = {
    "memorize": (100, 100, 100, 100, 99.2, 98.2, 96.5, 95.2, 93.2, 92.7, 90.4, 90.6),
    "detect_and_memorize": (100, 100, 100, 99.9, 99.8, 99.7, 98.9, 98.5, 98.6, 97.1, 97.1, 96.1),
    "reasoning": (100, 99.9, 97.4, 93.2, 91.5, 89.3, 87.4, 87.6, 84.8, 83.5, 83.5, 81.9),
}

SEGMENT_TOKENS = 499  # bert-base-cased: 512 - 10 memory tokens - 3 special tokens

# Input lengths of Figure 3 (the FLOP study), in tokens.
FIGURE3_TOKENS = (512, 1024, 2048, 4096, 8192, 16384, 32_000, 64_000, 128_000, 256_000, 512_000, 1_024_000, 2_048_000)


def paper_accuracy(task: str) -> dict[int, float]:
    """Segments -> accuracy in [0, 1]; empty for a task the paper does not report."""
    return {segments: value / 100 for segments, value in zip(SEGMENTS, ACCURACY.get(task, ()))}
