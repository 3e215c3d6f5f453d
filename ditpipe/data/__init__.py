"""Reading datasets: source readers, image normalisation, and the procedural ``builtin:shapes``."""
