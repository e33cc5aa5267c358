"""Bytes <-> values: layer blobs (v1), chunks and OCI JSON. No I/O in here."""
