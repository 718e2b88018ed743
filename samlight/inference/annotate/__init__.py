"""The browser annotation tool (`samlight annotate`): SAM-assisted masks saved as SA-1B shards, the model
retrained on them in the loop. images.py: the folder; store.py: the shards; engine.py: embeddings and the
decoder; retrain.py: fine-tuning rounds; server.py: the HTTP API; static/: the page."""
