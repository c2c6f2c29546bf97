"""Export: merged HF model + sentence-transformers folder, and an MTEB wrapper."""
