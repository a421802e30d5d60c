"""Text: the special tokens (tokens.py), box and point text formats and the answer grammar (boxes.py), the
prompt template (prompts.py), and the tokenizer the default model trains (tokenizer.py)."""
