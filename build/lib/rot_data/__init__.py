"""Shared by both sides: records (the render job reads CoTs, evaluation reads questions and gold answers),
file checksums and the shard format's constants."""
