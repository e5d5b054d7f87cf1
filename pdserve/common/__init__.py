"""torch-free code every layer may use: sampling parameters and their validation,
model files and tokenizer, recently seen ids."""
