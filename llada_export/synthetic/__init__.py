"""Synthetic stand-ins for what cannot be downloaded here: random-weight checkpoints in the
official layout (:mod:`.weights`) and stand-in tokenizers with the official special tokens
(:mod:`.tokenizer`)."""
