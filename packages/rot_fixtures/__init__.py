"""Test and benchmark fixtures: tiny random Qwen-VL checkpoints and tokenizers built offline.

Kept out of the packages that users' runs import (rot_train, rot_render, rot_eval never import it).
"""
