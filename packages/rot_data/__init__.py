"""Records shared by both sides: the render job reads CoTs from them, evaluation reads questions and gold answers."""
