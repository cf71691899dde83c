"""Training data: the embedded synthetic corpus, a byte-level fallback for text files, input readers and tokenizers
for preprocessing, indexed datasets, windowing and sampling."""
