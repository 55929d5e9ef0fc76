"""Input pipelines: text sources, the token cache and LM windows for pre-training, task readers."""
