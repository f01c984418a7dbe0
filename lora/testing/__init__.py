"""Loopback stand-ins for external services (Danbooru, the Hub, a Prefect server) for tests and demos."""
