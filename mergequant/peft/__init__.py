"""PEFT adapters: reading and applying LoRA adapters (BASE+ADAPTER), extracting them from fine-tunes, merging them."""
