// containerd's snapshotter conformance suite (snapshots/testsuite) against `lazyfs snapshotter`,
// reached the way containerd reaches a proxy plugin: snapshots/proxy over gRPC on a unix socket.
//
// Every test of the suite gets its own snapshotter process with its own root. Environment:
//
//	LAZYFS_SNAPSHOTTER_CMD   the command that starts it, split on spaces (e.g. "python3 -m lazyfs.cli snapshotter");
//	                         --address, --root and --writable-root are appended
//	LAZYFS_SUITE_WRITABLE    optional: a directory (ideally another file system) under which each
//	                         test's writable root is made, so commits cross file systems as in production
//
// Built in GOPATH mode against Debian's golang-github-containerd-containerd-dev (see test_conformance.py).
package lazyfssuite

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"
)

func startSnapshotter(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
	command := strings.Fields(os.Getenv("LAZYFS_SNAPSHOTTER_CMD"))
	if len(command) == 0 {
		return nil, nil, fmt.Errorf("LAZYFS_SNAPSHOTTER_CMD is not set")
	}
	data := filepath.Join(root, "data")
	writable := filepath.Join(root, "writable")
	if base := os.Getenv("LAZYFS_SUITE_WRITABLE"); base != "" {
		dir, err := os.MkdirTemp(base, "w-")
		if err != nil {
			return nil, nil, err
		}
		writable = dir
	}
	// a short path: unix socket addresses are limited to 108 bytes
	sockDir, err := os.MkdirTemp("", "lzs-")
	if err != nil {
		return nil, nil, err
	}
	sock := filepath.Join(sockDir, "s.sock")
	cmd := exec.Command(command[0], append(command[1:], "--address", sock, "--root", data, "--writable-root", writable)...)
	log, err := os.Create(filepath.Join(root, "snapshotter.log"))
	if err != nil {
		return nil, nil, err
	}
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		return nil, nil, err
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	stop := func() error {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(30 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
		log.Close()
		os.RemoveAll(sockDir)
		if writable != filepath.Join(root, "writable") {
			return os.RemoveAll(writable)
		}
		return nil
	}
	deadline := time.Now().Add(120 * time.Second)
	for {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			break
		}
		select {
		case err := <-exited:
			out, _ := os.ReadFile(filepath.Join(root, "snapshotter.log"))
			return nil, nil, fmt.Errorf("snapshotter exited (%v) before listening:\n%s", err, out)
		default:
		}
		if time.Now().After(deadline) {
			stop()
			return nil, nil, fmt.Errorf("snapshotter did not listen on %s in time", sock)
		}
		time.Sleep(50 * time.Millisecond)
	}
	conn, err := grpc.Dial("unix://"+sock, grpc.WithInsecure())
	if err != nil {
		stop()
		return nil, nil, err
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "lazyfs")
	return sn, func() error {
		conn.Close()
		return stop()
	}, nil
}

func TestLazyfsSnapshotter(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("the suite mounts: needs root")
	}
	testsuite.SnapshotterSuite(t, "lazyfs", startSnapshotter)
}
