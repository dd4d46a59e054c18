"""`loralab sweep`: many adapters from one command, the base model loaded once."""
