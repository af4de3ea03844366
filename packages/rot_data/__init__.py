"""The ground every other package stands on (it imports none of them): records, the shard contract, the shipped
models by name (registry.py, models/), the special tokens, the transformers-version shims, checksums and small helpers."""
