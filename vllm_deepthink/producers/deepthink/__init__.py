"""The Deep-Thinking builder: iterative forward tuning of the demonstrations' K/V.

builder.py builds an adapter: iteration.py runs the meta-optimizer, dev_scoring.py
scores each iteration on dev, candidates.py runs the candidates and chooses the kept
iteration; rotary.py rotates keys back by L positions for `--position-mode aligned`.
"""
