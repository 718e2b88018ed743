"""Scale: FSDP2 strategy and sharding, distributed and atomic checkpoint IO."""
