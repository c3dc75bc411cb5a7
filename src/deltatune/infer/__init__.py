"""Inference with a base model plus a delta: generation, chat, and (later) the HTTP server."""
