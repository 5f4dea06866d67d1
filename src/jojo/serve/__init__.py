"""`jojo serve`: the OpenAI-compatible HTTP API and the chat page over the batched engine (jojo.infer.batch)."""
