"""Getting chunks: backends (registry, directory), the trio scheduler, the cache."""
