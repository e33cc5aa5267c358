"""Random writes, discards, flushes, commits and reopens against a bytearray model."""

import os
import shutil
import tempfile

import trio
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from lazyfs.device.merged import MergedDevice
from lazyfs.device.writable import create_writable, open_writable
from lazyfs.format.layer import BLOCK_SIZE
from lazyfs.image.build import layer_from_writable
from lazyfs.image.layout import OciLayout
from tests.support.sources import CountingSource

from tests.device.test_merged import SIZE, make_stack

offsets = st.integers(0, SIZE - 1)
lengths = st.sampled_from([1, 100, BLOCK_SIZE - 1, BLOCK_SIZE, BLOCK_SIZE + 1, 3 * BLOCK_SIZE, 40000])


class StackMachine(RuleBasedStateMachine):
    @initialize(kind=st.sampled_from(["sparse", "log"]), seed=st.integers(0, 1000), nlayers=st.integers(1, 4))
    def setup(self, kind, seed, nlayers):
        self.tmp = tempfile.mkdtemp(prefix="lazyfs-stateful-")
        self.kind = kind
        self.layers, self.backend, self.model = make_stack(seed, nlayers)
        self.layout = OciLayout(os.path.join(self.tmp, "layout")).ensure()
        self.generation = 0
        self._new_writable()

    def _new_writable(self):
        self.generation += 1
        self.wdir = os.path.join(self.tmp, f"w{self.generation}")
        self.writable = create_writable(self.wdir, self.kind, SIZE)
        self.dev = MergedDevice(self.layers, CountingSource(self.backend), self.writable)

    def teardown(self):
        if hasattr(self, "writable"):
            self.writable.close()
            shutil.rmtree(self.tmp, ignore_errors=True)

    @rule(offset=offsets, length=lengths, fill=st.sampled_from(["rand", "zero", "const"]))
    def write(self, offset, length, fill):
        length = min(length, SIZE - offset)
        data = {"rand": os.urandom(length), "zero": bytes(length), "const": b"\x5a" * length}[fill]
        trio.run(self.dev.write, offset, data)
        self.model[offset : offset + length] = data

    @rule(offset=offsets, length=lengths)
    def discard(self, offset, length):
        length = min(length, SIZE - offset)
        trio.run(self.dev.discard, offset, length)
        self.model[offset : offset + length] = bytes(length)

    @rule()
    def flush(self):
        trio.run(self.dev.flush)

    @rule()
    def reopen(self):
        trio.run(self.dev.flush)
        self.writable.close()
        self.writable = open_writable(self.wdir)
        self.dev = MergedDevice(self.layers, CountingSource(self.backend), self.writable)

    @precondition(lambda self: len(self.layers) < 12)
    @rule()
    def commit(self):
        trio.run(self.dev.flush)
        built = layer_from_writable(self.layout, self.writable, self.layers, chunk_size=16 * 1024)
        with open(self.layout.blob_path(built.descriptor.digest), "rb") as f:
            self.backend.blobs[built.descriptor.digest] = f.read()
        self.writable.close()
        self.layers = self.layers + [(built.meta, built.descriptor.digest)]
        self._new_writable()

    @rule(offset=offsets, length=lengths)
    def read_some(self, offset, length):
        assert trio.run(self.dev.read, offset, length) == bytes(self.model[offset : offset + length])

    @invariant()
    def whole_device_matches(self):
        if hasattr(self, "dev"):
            assert trio.run(self.dev.read, 0, SIZE) == bytes(self.model)


StackMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)
TestStack = StackMachine.TestCase
