"""Datamodules: SA-1B WebDataset streaming, fine-tuning datasets and shard tools."""
