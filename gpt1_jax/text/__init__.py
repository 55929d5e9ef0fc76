"""GPT-1's text side: the BPE tokenizer with the original's preprocessing, and its vocabulary files."""
