"""containerd integration: `lazyfs snapshotter` (a proxy snapshotter) and `lazyfs rpull`."""
