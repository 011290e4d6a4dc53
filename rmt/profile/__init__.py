"""Cost studies of the Recurrent Memory Transformer: analytic forward-pass FLOPs
(`rmt.profile.flops`, the paper's Figure 3) and the `rmt profile` commands.

Nothing here imports torch at module level, so the estimates (and the CLI) start fast.
"""
