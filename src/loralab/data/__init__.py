"""Training data: records, chat-template rendering with loss masks, batching."""
