"""A FUSE front end that speaks the kernel protocol on /dev/fuse itself (no libfuse).

- ``protocol``: the sans-IO codec (linux/fuse.h structs: requests in, replies and notifications out).
- ``exports``: the export tree (``NAME/disk.img`` per block source) answering decoded requests.
- ``session``: the trio shell: mount(2), read /dev/fuse, dispatch, reply with writev; takeover.
- ``keeper``: the tiny stdlib process that holds the /dev/fuse fd across daemon restarts.
"""
