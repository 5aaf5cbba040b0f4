"""GGUF (llama.cpp) export: our own block quantizers (byte-identical to llama.cpp's reference), llama.cpp's
per-tensor type mixes, tokenizer metadata, and a streaming writer that produces several file types in
one pass over the checkpoint. See docs/gguf.md."""
