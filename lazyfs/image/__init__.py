"""Images: OCI layouts and registries, building layers, opening devices."""
