"""The RoT model that training and evaluation both use: model and head, backbone loading, export/load, the decoding
engine, fused projections, the batches and the shard stream that feed it."""
