"""Weights on disk: safetensors read and written strictly, Hugging Face BERT folders, ctxvec's
own model folders, and training checkpoints. Nothing is ever unpickled."""
