"""Stage 5: accuracy parity of every exported model against the float model; int8 diagnosis and remedies."""
