"""The embedded ``torch`` train backend (HF model + AdamW) and the tiny default run it trains. Nothing
heavy is imported here."""
