"""Defaults the CLIs show in --help (import-light)."""

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # Hugging Face's classic "5GB"
INIT_STD = 0.02  # std of the random normal init (the official initializer_range)
