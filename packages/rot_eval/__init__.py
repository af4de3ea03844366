"""Evaluation of trained RoT exports (``rot-eval``): latent and text generation without a vision tower,
answer extraction, accuracy tables with intervals, the controls, pictures of the latents and reading them back.

It reads what ``rot_train`` exports and never trains; ``rot_train`` never imports it.
"""

MAX_ANSWER_TOKENS = 32  # answer tokens decoded after the latents (or the CoT), unless --max-answer-tokens says otherwise
