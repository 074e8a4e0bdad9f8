"""The OpenAI-compatible Best-of-N server: protocol (models), service (logic), app (HTTP)."""
