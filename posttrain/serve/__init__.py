"""An OpenAI-compatible HTTP server over the built-in sampler (`posttrain serve`, docs/serve.md)."""
