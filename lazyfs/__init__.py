"""lazyfs: lazy-loading block-layer images for containers and VMs."""

__version__ = "0.1.0"
