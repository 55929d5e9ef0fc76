"""The network: the GPT-1 decoder (`transformer`), its task heads and losses, and what runs it on text
without training (`sampling`, `scoring`)."""
