"""Data: the builtin corpus and user data, the BPE tokenizer, and packed loaders."""
