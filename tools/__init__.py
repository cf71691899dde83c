"""Command-line tools: tokenizer training, dataset preprocessing."""
