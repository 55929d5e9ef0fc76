"""Weights in and out: OpenAI's released shards and Hugging Face folders read and written, a model loaded from
any of them for use, and the checkpoints shipped in the package (`pretrained`)."""
