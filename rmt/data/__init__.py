"""Synthetic long-context tasks (the paper's Memorize, Detect & Memorize, Reasoning) as
deterministic datasets: task registry (`rmt.data.tasks`), noise text (`rmt.data.noise`),
example generator (`rmt.data.generator`), on-disk format (`rmt.data.dataset`)."""
