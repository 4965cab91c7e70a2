"""Data: WebDataset shard writer, streaming reader and the bundled demo domain."""
