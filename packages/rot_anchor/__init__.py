"""How the shipped anchor VLM was made: its architecture and byte tokenizer, the pretraining mixture and loop, its
figures (``rot-anchor``). The checkpoint itself ships in ``rot_data/models/anchor`` (``rot_data.registry``)."""
