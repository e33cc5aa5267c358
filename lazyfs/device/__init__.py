"""Block sources: read-only layers, the merged device and writable layers."""
