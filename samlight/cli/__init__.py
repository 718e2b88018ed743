"""The `samlight` command: entry point, training CLI, config checks, export."""
