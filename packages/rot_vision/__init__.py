"""Text as visual embeddings and back: the renderer, the frozen vision tower, packed attention, a VLM reading visual tokens as text."""
