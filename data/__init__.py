"""Training data: the embedded synthetic corpus, a byte-level fallback for text files, windowing and sampling."""
