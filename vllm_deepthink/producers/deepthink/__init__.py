"""The Deep-Thinking builder: iterative forward tuning of the demonstrations' K/V.

builder.py runs the meta-optimizer and selects the iteration; rotary.py rotates keys
back by L positions for `--position-mode aligned`.
"""
