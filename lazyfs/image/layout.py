"""An OCI image layout directory (``oci-layout``, ``index.json``, ``blobs/sha256/…``)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

from lazyfs.durable import replace_durably, write_atomically
from lazyfs.errors import FormatError, IntegrityError, NotFoundError
from lazyfs.format.digest import check_sha256, sha256_digest
from lazyfs.format.oci import (
    ANN_REF_NAME,
    MEDIA_TYPE_MANIFEST,
    Descriptor,
    build_index,
    parse_index,
)

_LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'


class OciLayout:
    """Blobs and tagged manifests in one directory, readable by skopeo/umoci."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)

    # ------------------------------------------------------------ layout

    def exists(self) -> bool:
        return os.path.isfile(os.path.join(self.path, "oci-layout"))

    def ensure(self) -> "OciLayout":
        os.makedirs(os.path.join(self.path, "blobs", "sha256"), exist_ok=True)
        if not self.exists():
            write_atomically(os.path.join(self.path, "oci-layout"), _LAYOUT)
        if not os.path.exists(os.path.join(self.path, "index.json")):
            write_atomically(os.path.join(self.path, "index.json"), build_index([]))
        return self

    def _require(self) -> None:
        if not self.exists():
            raise NotFoundError(f"{self.path} is not an OCI image layout (no oci-layout file)")

    # ------------------------------------------------------------ blobs

    def blob_path(self, digest: str) -> str:
        check_sha256(digest, "blob digest")
        return os.path.join(self.path, "blobs", "sha256", digest[7:])

    def has_blob(self, digest: str) -> bool:
        return os.path.exists(self.blob_path(digest))

    def put_bytes(self, data: bytes, media_type: str = "application/octet-stream") -> Descriptor:
        digest = sha256_digest(data)
        path = self.blob_path(digest)
        if not os.path.exists(path):
            write_atomically(path, data)
        return Descriptor(media_type, digest, len(data))

    def new_blob_file(self) -> tempfile._TemporaryFileWrapper:
        """A temporary file inside the layout, to be moved in with adopt_blob()."""
        self.ensure()
        return tempfile.NamedTemporaryFile(dir=os.path.join(self.path, "blobs"), prefix=".incoming-", delete=False)

    def adopt_blob(self, tmp_path: str, digest: str) -> str:
        """Move a finished, fsynced temp file to its content address (digest computed by the writer)."""
        path = self.blob_path(digest)
        os.chmod(tmp_path, 0o644)
        replace_durably(tmp_path, path)
        return path

    def read_blob(self, digest: str, max_size: int = 64 << 20) -> bytes:
        path = self.blob_path(digest)
        try:
            with open(path, "rb") as f:
                data = f.read(max_size + 1)
        except FileNotFoundError:
            raise NotFoundError(f"blob {digest} not in {self.path}") from None
        if len(data) > max_size:
            raise FormatError(f"blob {digest} is larger than {max_size} bytes")
        got = sha256_digest(data)
        if got != digest:
            raise IntegrityError(f"blob in {self.path}", digest, got)
        return data

    def verify_blob_file(self, digest: str) -> None:
        """Hash a (possibly large) blob file; IntegrityError if it does not match its name."""
        h = hashlib.sha256()
        with open(self.blob_path(digest), "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        got = "sha256:" + h.hexdigest()
        if got != digest:
            raise IntegrityError(f"blob file in {self.path}", digest, got)

    # ------------------------------------------------------------ tags

    def _index(self) -> list[Descriptor]:
        self._require()
        with open(os.path.join(self.path, "index.json"), "rb") as f:
            return parse_index(f.read(), f"{self.path}/index.json")

    def tags(self) -> dict[str, Descriptor]:
        return {d.annotations[ANN_REF_NAME]: d for d in self._index() if ANN_REF_NAME in d.annotations}

    def resolve(self, tag_or_digest: str) -> Descriptor:
        if tag_or_digest.startswith("sha256:"):
            for d in self._index():
                if d.digest == tag_or_digest:
                    return d
            return Descriptor(MEDIA_TYPE_MANIFEST, tag_or_digest, os.path.getsize(self.blob_path(tag_or_digest)))
        tags = self.tags()
        if tag_or_digest not in tags:
            known = ", ".join(sorted(tags)) or "none"
            raise NotFoundError(f"no tag {tag_or_digest!r} in {self.path} (tags: {known})")
        return tags[tag_or_digest]

    def read_manifest(self, tag_or_digest: str) -> tuple[bytes, Descriptor]:
        desc = self.resolve(tag_or_digest)
        return self.read_blob(desc.digest), desc

    def put_manifest(self, data: bytes, tag: str | None, media_type: str = MEDIA_TYPE_MANIFEST,
                     annotations: dict[str, str] | None = None) -> Descriptor:
        """Store a manifest and point *tag* at it (replacing an older one); *annotations* go on the index entry."""
        self.ensure()
        desc = self.put_bytes(data, media_type)
        if tag is not None:
            entries = [d for d in self._index() if d.annotations.get(ANN_REF_NAME) != tag]
            entries.append(Descriptor(media_type, desc.digest, desc.size, {**(annotations or {}), ANN_REF_NAME: tag}))
            write_atomically(os.path.join(self.path, "index.json"), build_index(entries))
        return desc

    def index_json(self) -> dict:
        with open(os.path.join(self.path, "index.json"), "rb") as f:
            return json.loads(f.read())
