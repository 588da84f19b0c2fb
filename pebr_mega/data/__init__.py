"""Data: SFT filtering, GRPO records, prompt template, image preprocessing, difficulty split, synthetic set."""
