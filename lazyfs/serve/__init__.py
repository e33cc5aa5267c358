"""Front ends that serve a block source: FUSE file, TCMU SCSI LUN, daemon and control API."""
