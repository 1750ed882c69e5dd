"""qconvert auto: per-layer sensitivity, then the smallest mix of methods and bit widths that meets a target.

`sensitivity` measures each layer's gain (how much of its output noise reaches the model's outputs),
`options` lists each weight's ways to be stored with their size and predicted noise, `allocation` picks
one per weight for an aim, and `search` converts and validates plans until one meets the target.
"""
