"""Offline shard tools: convert formats into SA-1B shards, prepare, inspect."""
