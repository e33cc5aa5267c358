"""The lazyfs command line: parses arguments and calls the library. No logic lives here."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

from lazyfs.errors import ConfigError, LazyfsError, one_line

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``4096``, ``64M``, ``1G``, ``2GiB`` -> bytes."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1] if t and t[-1] in _UNITS else ""
    number = t[: -1] if unit else t
    try:
        value = float(number) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if value <= 0 or value != int(value):
        raise argparse.ArgumentTypeError(f"not a positive whole number of bytes: {text!r}")
    return int(value)


def _local(text: str):
    from lazyfs.image.ref import parse_local_ref

    ref = parse_local_ref(text)
    if ref is None:
        raise ConfigError(f"{text!r} is not a local image (use oci:DIR[:TAG] or a path); registry images come with push/pull")
    return ref


def _print(result: object, as_json: bool) -> None:
    if as_json or not isinstance(result, dict):
        print(json.dumps(result, indent=2, default=str))
        return
    for key, value in result.items():
        if isinstance(value, list):
            print(f"{key}:")
            for item in value:
                print("  - " + (", ".join(f"{k}={v}" for k, v in item.items()) if isinstance(item, dict) else str(item)))
        else:
            print(f"{key}: {value}")


# ---------------------------------------------------------------- commands


def _run_async(async_fn, *args):
    """``trio.run(async_fn, *args)``. trio is imported here, by the commands that need it: `lazyfs
    mount`, `umount` and `export` talk to the daemon without it (its import is most of their start)."""
    import trio

    return trio.run(async_fn, *args)


def _run_with_progress(args: argparse.Namespace, run, summary) -> int:
    """``trio.run(run, progress)`` (a rich progress display unless --quiet or --json), then print
    its result: as JSON with --json, else the line ``summary(result)`` unless --quiet."""
    if args.quiet or args.json:
        result = _run_async(run, None)
    else:
        from lazyfs.image.progress import RichProgress

        with RichProgress() as progress:
            result = _run_async(run, progress)
    if args.json:
        _print(result, True)
    elif not args.quiet:
        print(summary(result))
    return 0


def cmd_create(args: argparse.Namespace) -> int:
    from lazyfs.image.local import create_image

    result = _run_async(lambda: create_image(
        _local(args.image), size=args.size, from_file=args.from_file, from_dir=args.from_dir,
        base=_local(args.base) if args.base else None, chunk_size=args.chunk_size))
    _print(result, args.json)
    return 0


def cmd_commit(args: argparse.Namespace) -> int:
    if args.out is None:  # lazyfs commit TARGET REF: a mounted writable image, through the daemon
        from lazyfs.serve.mount import commit_target

        result = commit_target(_config(args), args.image, args.writable, plain_http=_plain_http(args))
    else:
        from lazyfs.image.local import commit_image

        result = _run_async(commit_image, _local(args.image), args.writable, _local(args.out), args.chunk_size)
    _print(result, args.json)
    return 0


def _config(args: argparse.Namespace):
    """The config file, with this call's --plain-http registries."""
    from lazyfs.config import load_config

    return load_config(args.config).with_plain_http(_plain_http(args))


def _plain_http(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(getattr(args, "plain_http", None) or ())


def cmd_config(args: argparse.Namespace) -> int:
    from lazyfs.config import config_path, config_schema

    if args.action == "schema":
        print(json.dumps(config_schema(), indent=2))
        return 0
    config = _config(args)
    if args.toml:
        print(f"# effective configuration (from {config_path(args.config) or 'built-in defaults'})")
        print(config.to_toml(), end="")
    else:
        print(json.dumps(config.to_json(), indent=2))
    return 0


def _remote(text: str):
    from lazyfs.format.reference import parse_reference

    return parse_reference(text)


def cmd_push(args: argparse.Namespace) -> int:
    from lazyfs.image.remote import ImageOpener, push_image

    async def run():
        async with ImageOpener(_config(args)) as opener:
            return await push_image(opener, _local(args.image), _remote(args.ref))

    _print(_run_async(run), args.json)
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from lazyfs.image.remote import ImageOpener, pull_image

    async def run():
        async with ImageOpener(_config(args)) as opener:
            return await pull_image(opener, _remote(args.ref), _local(args.image))

    _print(_run_async(run), args.json)
    return 0


def import_daemon() -> Callable[..., int]:
    """``lazyfs.serve.daemon.main``, imported with the cyclic garbage collector off, and what the
    import made frozen out of every later collection (``gc.freeze``). The import makes tens of
    thousands of objects the collector tracks (the modules, classes and functions of trio, httpx
    and lazyfs), next to no garbage: 87 collections walked them during the import (25-85 ms of it),
    and each full collection of the long-lived daemon walked them again, holding the event loop:
    17-29 ms for the one a cold start sets off, 3-6 ms frozen (BENCHMARKS.md, "Cold start: the
    daemon's imports")."""
    import gc

    gc.disable()
    try:
        from lazyfs.serve.daemon import main
    finally:
        gc.freeze()
        gc.enable()
    return main


def cmd_daemon(args: argparse.Namespace) -> int:
    return import_daemon()(_config(args), lambda: _config(args))


def cmd_store_mount_namespace(args: argparse.Namespace) -> int:
    from lazyfs.serve.hostns import store_namespace_fd

    store_namespace_fd(args.namespace)
    return 0


def cmd_mount(args: argparse.Namespace) -> int:
    from lazyfs.serve.mount import mount_image

    result = mount_image(_config(args), args.config, args.image, args.target, writable=args.writable,
                         writable_root=args.writable_root, kind=args.kind, prefer_lazyfs=args.prefer_lazyfs,
                         plain_http=_plain_http(args), devices=args.dev, setuid=args.suid, hydrate=_hydrate(args))
    if result.get("note"):  # a twin was mounted instead of the image named: never silently
        print(f"lazyfs: {result['note']}", file=sys.stderr)
    if result.get("via"):  # an ordinary image, through its lazyfs index: say which path was taken
        print(f"lazyfs: {args.image} is an ordinary image: mounted via {result['via']}", file=sys.stderr)
    if args.json:
        _print(result, True)
    else:
        mode = "read-write" if args.writable else "read-only"
        route = {"hydrated": f"loop on the hydrated local file {result.get('loop_file')}, no FUSE",
                 "buffered": "buffered loop"}.get(result.get("loop_route"), "direct-I/O loop")
        via = f" via {result['via'].split(' (')[0]}" if result.get("via") else ""
        print(f"mounted {result.get('image', args.image)} at {result['target']} ({mode}, {result['loop']}, {route})"
              f"{via} in {result['seconds']:.3f} s")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from lazyfs.serve.mount import export_image

    result = export_image(_config(args), args.config, args.image, args.directory, writable=args.writable,
                          writable_root=args.writable_root, kind=args.kind, plain_http=_plain_http(args),
                          hydrate=_hydrate(args))
    print(result["file"])
    return 0


def _hydrate(args: argparse.Namespace) -> bool | dict | None:
    """What --hydrate, --hydrate-rate, --hydrate-deadline and --no-hydrate ask for (None: the config's default)."""
    from lazyfs.errors import ConfigError

    paced = args.hydrate_rate is not None or args.hydrate_deadline is not None
    if paced and args.hydrate is False:
        raise ConfigError("--no-hydrate with --hydrate-rate or --hydrate-deadline: choose one")
    if args.hydrate_rate is not None:
        return {"rate": args.hydrate_rate}
    if args.hydrate_deadline is not None:
        return {"deadline": args.hydrate_deadline}
    return args.hydrate


def _hydrate_options(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--hydrate", action="store_true", default=None,
                       help="make the image fully local in the background (then it runs without the registry)")
    group.add_argument("--no-hydrate", dest="hydrate", action="store_false", help="do not, whatever the config says")
    group = p.add_mutually_exclusive_group()  # either implies --hydrate
    group.add_argument("--hydrate-rate", type=parse_size, metavar="BYTES",
                       help="hydrate at this many bytes per second (e.g. 50M)")
    group.add_argument("--hydrate-deadline", type=_positive_seconds, metavar="SECONDS",
                       help="hydrate by this many seconds from now (the rate follows from what is left)")


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (0 < value < 1e9):
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number of seconds")
    return value


def cmd_umount(args: argparse.Namespace) -> int:
    from lazyfs.serve.mount import umount_target

    result = umount_target(_config(args), args.target)
    for line in result["done"]:
        print(line)
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    from lazyfs.serve.control import call

    _print(call(_config(args).socket_path, "reload", timeout=60), args.json)
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    from lazyfs import __version__
    from lazyfs.serve.control import call

    config = _config(args)
    try:
        daemon = call(config.socket_path, "ping", timeout=10)
    except LazyfsError:
        daemon = None
    if args.json:
        _print({"version": __version__, "daemon": daemon}, True)
    elif daemon is None:
        print(f"lazyfs {__version__} (no daemon answers on {config.socket_path})")
    else:
        print(f"lazyfs {__version__} (daemon {daemon.get('version', 'before 0.1.0')}, pid {daemon['pid']})")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from lazyfs.serve.mount import stats

    result = stats(_config(args), args.target)
    if args.json or args.target is None:
        _print(result, True)
        return 0
    sched = result["scheduler"]
    lat = sched.get("latency", {})
    hits = sched.get("memory_hits", 0) + sched.get("disk_hits", 0)
    print(f"image:          {result['image']}")
    print(f"size:           {result['size']} bytes")
    print(f"bytes read:     {result['device']['bytes_read']}")
    print(f"bytes fetched:  {sched.get('bytes_fetched', 0)} over the network (host-wide, readahead and prefetch included)")
    print(f"demand misses:  {result['bytes_missed']} stored bytes this image waited for")
    print(f"chunk reads:    {result['chunk_reads']}, misses {result['demand_misses']}")
    flat_bytes = result["device"].get("block_cache", {}).get("bytes", 0)
    print(f"cached:         {flat_bytes} bytes in this image's flat layer files, "
          f"{sched['cache'].get('entries', '?')} chunk files (host-wide)")
    # reads the flat layer files serve never reach the scheduler: its hit rate is of the rest
    print(f"hit rate:       {hits / max(1, sched.get('requests', 0)):.1%} of the chunk requests that reached "
          "the scheduler (host-wide)")
    print(f"fetch latency:  p50 {lat.get('p50', 0) * 1000:.1f} ms, p95 {lat.get('p95', 0) * 1000:.1f} ms, "
          f"p99 {lat.get('p99', 0) * 1000:.1f} ms")
    hyd = result.get("hydration") or {}
    if hyd:
        total = max(1, hyd.get("bytes_total", 0))
        state = "yes" if hyd.get("hydrated") else ("in progress" if result.get("hydrate") is not None else "no")
        print(f"local:          {hyd.get('bytes_local', 0)} of {hyd.get('bytes_total', 0)} stored bytes "
              f"({hyd.get('bytes_local', 0) / total:.1%}); hydrated: {state}")
    return 0


def cmd_writable(args: argparse.Namespace) -> int:
    from lazyfs.image.local import new_writable

    print(_run_async(new_writable, _local(args.image), args.directory, args.kind))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from lazyfs.image.local import image_info

    _print(_run_async(image_info, _local(args.image)), args.json)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from lazyfs.image.local import verify_image
    from lazyfs.image.ref import parse_local_ref

    if parse_local_ref(args.image) is None:  # a registry image: every object against the chain of digests
        from lazyfs.image.remote import ImageOpener
        from lazyfs.image.verify import verify_remote

        async def run(progress):
            async with ImageOpener(_config(args)) as opener:
                return await verify_remote(opener, args.image, progress)

        return _run_with_progress(args, run, lambda result: (
            f"{args.image}: {result['manifest']}, anchored by {result['anchor']}: config, "
            f"{result['layers']} layer(s), {result['chunks_checked']} chunks and {result['bytes_checked']} "
            f"bytes match their digests"))
    problems = _run_async(verify_image, _local(args.image))
    for problem in problems:
        print(f"BAD {problem}")
    if problems:
        more = f" (and {len(problems) - 1} more, listed above)" if len(problems) > 1 else ""
        raise LazyfsError(f"{problems[0]}{more}")
    print(f"{args.image}: every blob and chunk digest matches")
    return 0


def cmd_flatten(args: argparse.Namespace) -> int:
    from lazyfs.image.local import flatten_image

    size = _run_async(flatten_image, _local(args.image), args.out)
    print(f"{args.out}: {size} bytes")
    return 0


def cmd_snapshotter(args: argparse.Namespace) -> int:
    from lazyfs.serve.snapshotter.service import DEFAULT_ROOT, main as snapshotter_main

    config = _config(args)
    writable_root = args.writable_root or os.path.join(config.writable_root, "snapshotter")
    return snapshotter_main(config, args.config, args.address, args.root or DEFAULT_ROOT, writable_root, args.mode)


def cmd_rpull(args: argparse.Namespace) -> int:
    from lazyfs.serve.snapshotter.rpull import rpull

    if args.plain_http:
        # the layers are fetched by the snapshotter, a service with settings of its own
        raise ConfigError(f"--plain-http {args.plain_http[0]} cannot reach the snapshotter, which fetches the layers: "
                          f"list {{\"host\": \"{args.plain_http[0]}\", \"plain_http\": true}} in the registries of "
                          "its config file (or start `lazyfs snapshotter --plain-http HOST:PORT`)")
    result = rpull(_config(args), args.ref, address=args.address, namespace=args.namespace,
                   snapshotter=args.snapshotter, platform=args.platform)
    if result["via"].startswith("plain pull"):  # not lazy: never silently
        print(f"lazyfs: {args.ref}: {result['via']}: every layer was downloaded and unpacked", file=sys.stderr)
    _print(result, args.json)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from lazyfs.image.convert import convert_image
    from lazyfs.image.remote import ImageOpener

    async def run(progress):
        async with ImageOpener(_config(args)) as opener:
            return await convert_image(opener, args.source, args.target, platform=args.platform,
                                       chunk_size=args.chunk_size, use_cache=not args.no_cache, progress=progress)

    return _run_with_progress(args, run, lambda result: (
        f"{result['target']}: {result['manifest']} ({result['layers_converted']} layer(s) converted, "
        f"{result['layers_reused']} reused, {result['bytes_pushed']} bytes pushed, {result['seconds']:.1f} s)"))


def cmd_index(args: argparse.Namespace) -> int:
    from lazyfs.image.index import index_image
    from lazyfs.image.remote import ImageOpener

    async def run(progress):
        async with ImageOpener(_config(args)) as opener:
            return await index_image(opener, args.source, platform=args.platform, chunk_size=args.chunk_size,
                                     span_size=args.span_size, progress=progress)

    def line(result: dict) -> str:
        return (f"{result['source']}: index {result['index']} ({len(result['layers'])} layer(s), "
                f"{result['index_bytes']} bytes = {100 * result['index_ratio']:.1f}% of {result['source_bytes']}, "
                f"span map documents {result['span_doc_bytes']} bytes, "
                f"built in {result['build_seconds']:.1f} s)")

    return _run_with_progress(args, run, lambda result: "\n".join(
        f"{one['platform']}: {line(one)}" for one in result["platforms"]) if "platforms" in result else line(result))


def cmd_doctor(args: argparse.Namespace) -> int:
    from lazyfs.doctor import examine

    report = examine(_config(args))
    if args.json:
        _print(report.to_json(), True)
    else:
        print("\n".join(report.lines()))
    return report.exit_status


def cmd_tcmu(args: argparse.Namespace) -> int:
    from lazyfs.serve.control import call
    from lazyfs.serve.mount import ensure_daemon, writable_dir_under

    config = _config(args)
    if args.action == "attach":
        if not args.image:
            raise ConfigError("lazyfs tcmu attach needs IMAGE and NAME")
        writable_dir = writable_dir_under(args.writable_root, f"tcmu-{args.name}", args.writable)
        ensure_daemon(config, args.config)
        result = call(config.socket_path, "tcmu-attach", image=args.image, name=args.name, writable=args.writable,
                      block_size=args.block_size, writable_dir=writable_dir, plain_http=list(_plain_http(args)))
        print(f"{args.image} is SCSI disk {result['disk']} (TCMU device {args.name})")
    else:
        if args.image or args.writable or args.writable_root or args.plain_http:
            raise ConfigError("lazyfs tcmu detach takes only NAME")
        call(config.socket_path, "tcmu-detach", name=args.name)
        print(f"detached TCMU device {args.name}")
    return 0


def _terminal_columns() -> int:
    """``shutil.get_terminal_size().columns``, without importing shutil: it loads bz2, lzma and zlib
    with it (7 modules, ~5 ms of a cold start; issue 14)."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns or 80
        except (AttributeError, ValueError, OSError):  # no stdout, or not a terminal
            columns = 80
    return columns


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, told the width argparse would find: argparse makes one for every
    argument added, and each would import shutil for it (see ``_terminal_columns``)."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position, _terminal_columns() - 2 if width is None else width)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lazyfs", description="Lazy-loading block-layer images for containers and VMs.",
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, formatter_class=_HelpFormatter)
        p.set_defaults(func=func)
        return p

    chunk = {"type": parse_size, "default": 256 << 10, "help": "chunk size (power of two, default 256K)"}
    p = add("create", cmd_create, "create an image in an OCI layout: empty, from a raw file or from a directory tree")
    p.add_argument("image", help="oci:DIR[:TAG] or a path")
    p.add_argument("--size", type=parse_size, help="virtual disk size (empty image, or ext4 size with --from-dir)")
    p.add_argument("--from-file", metavar="RAW", help="a raw disk image file (e.g. ext4)")
    p.add_argument("--from-dir", metavar="DIR", help="make an ext4 filesystem holding this tree")
    p.add_argument("--base", metavar="IMAGE", help="stack the new layer over this image, storing only differences")
    p.add_argument("--chunk-size", **chunk)
    p.add_argument("--json", action="store_true")

    p = add("commit", cmd_commit, "commit a mounted writable image (TARGET REF), or a writable layer over IMAGE (IMAGE DIR OUT)")
    p.add_argument("image", help="a mount target, or an image")
    p.add_argument("writable", help="the new image reference (with TARGET), or the writable layer directory")
    p.add_argument("out", nargs="?", help="the new image (with IMAGE DIR)")
    p.add_argument("--chunk-size", **chunk)
    p.add_argument("--json", action="store_true")

    p = add("writable", cmd_writable, "create an empty writable layer over IMAGE in DIRECTORY")
    p.add_argument("image")
    p.add_argument("directory")
    p.add_argument("--kind", choices=["sparse", "log"], default="sparse")

    p = add("info", cmd_info, "show layers, sizes, chunks, holes and the dedup ratio")
    p.add_argument("image")
    p.add_argument("--json", action="store_true")

    p = add("verify", cmd_verify, "check every blob and chunk digest of a local or registry image against the "
                                  "manifest; exit 1 naming the first mismatch")
    p.add_argument("image", help="oci:DIR[:TAG], a path, or a registry reference")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary (registry images)")

    p = add("flatten", cmd_flatten, "write the merged device to a raw file")
    p.add_argument("image")
    p.add_argument("out")
    p = add("push", cmd_push, "upload a local image to a registry")
    p.add_argument("image")
    p.add_argument("ref", help="registry reference, e.g. 127.0.0.1:5000/app:1")
    p.add_argument("--json", action="store_true")

    p = add("pull", cmd_pull, "fetch an image's metadata (manifest, config, layer metadata) into a local layout")
    p.add_argument("ref")
    p.add_argument("image")
    p.add_argument("--json", action="store_true")

    p = add("config", cmd_config, "show the effective configuration, or the JSON schema of the config file")
    p.add_argument("action", choices=["show", "schema"])
    p.add_argument("--toml", action="store_true", help="show as TOML (default JSON)")

    add("daemon", cmd_daemon, "run the host daemon in the foreground (mount starts one if needed)")
    p = add("store-mount-namespace", cmd_store_mount_namespace,
            "for a systemd unit's ExecStartPre=+: hand the host's mount namespace to the sandboxed daemon "
            "(docs/daemon.md)")
    p.add_argument("namespace", nargs="?", default="/proc/1/ns/mnt")

    p = add("convert", cmd_convert, "convert an OCI/Docker image (registry or layout) into a lazyfs image")
    p.add_argument("source", help="registry reference or oci:DIR[:TAG]")
    p.add_argument("target", help="registry reference or oci:DIR[:TAG]")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="from a multi-arch index (default: this host's)")
    p.add_argument("--chunk-size", **chunk)
    p.add_argument("--no-cache", action="store_true",
                   help="convert every layer again (no reuse from the local cache or the target)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary (no progress bars)")

    p = add("index", cmd_index, "index an ordinary OCI image for lazy start without converting it (docs/index.md)")
    p.add_argument("source", help="registry reference or oci:DIR[:TAG]; the index is stored as its referrer")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]|all",
                   help="from a multi-arch index (default: this host's; all: every platform, an index each)")
    p.add_argument("--chunk-size", **chunk)
    p.add_argument("--span-size", type=parse_size, default=256 << 10,
                   help="uncompressed bytes per verified span (default 256K; gzip layers keep a 32 KiB window "
                        "every 1M, the spans in between take theirs from the span before)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary (no progress bars)")

    p = add("mount", cmd_mount, "mount IMAGE (registry reference or local layout) at TARGET, lazily")
    p.add_argument("image")
    p.add_argument("target")
    p.add_argument("--writable", action="store_true", help="writable, with a writable layer under the writable root")
    p.add_argument("--writable-root", metavar="DIR", help="where writable layers live (default from the config)")
    p.add_argument("--kind", choices=["sparse", "log"], default="sparse", help="writable layer kind")
    p.add_argument("--prefer-lazyfs", action="store_true",
                   help="IMAGE may be an ordinary image: mount the lazyfs image converted from it, if this host "
                        "converted it or it is signed by a trusted key (docs/trust.md)")
    p.add_argument("--dev", action="store_true", help="honour device nodes in the image (default: nodev)")
    p.add_argument("--suid", action="store_true", help="honour set-user/group-ID files in the image (default: nosuid)")
    _hydrate_options(p)
    p.add_argument("--json", action="store_true")

    p = add("export", cmd_export, "export IMAGE as DIRECTORY/disk.img only (for qemu -drive and Kata)")
    p.add_argument("image")
    p.add_argument("directory")
    p.add_argument("--writable", action="store_true")
    p.add_argument("--writable-root", metavar="DIR", help="where writable layers live (default from the config)")
    p.add_argument("--kind", choices=["sparse", "log"], default="sparse")
    _hydrate_options(p)

    p = add("umount", cmd_umount, "unmount (or unexport) TARGET and detach everything behind it")
    p.add_argument("target")

    p = add("reload", cmd_reload, "make the daemon re-read its registries and mirrors (as SIGHUP does)")
    p.add_argument("--json", action="store_true")

    p = add("stats", cmd_stats, "bytes read and fetched, cache hits and fetch latency (of TARGET, or all)")
    p.add_argument("target", nargs="?")
    p.add_argument("--json", action="store_true")

    p = add("snapshotter", cmd_snapshotter, "serve containerd's snapshots API (a proxy plugin) on a unix socket")
    p.add_argument("--address", default="/run/lazyfs/snapshotter.sock", help="unix socket to listen on")
    p.add_argument("--root", help="snapshot data and metadata, big disk (default /var/lib/lazyfs/snapshotter)")
    p.add_argument("--writable-root", metavar="DIR",
                   help="containers' writable layers, fast disk (default WRITABLE_ROOT/snapshotter from the config)")
    p.add_argument("--mode", choices=["overlay", "block"], default="overlay",
                   help="writable state of containers on lazyfs images: overlay upper dir (default) or a lazyfs "
                        "writable layer under a block device")

    p = add("rpull", cmd_rpull, "pull an image into containerd lazily (metadata only), ready for ctr run: a lazyfs "
                                "image, or an ordinary one through its lazyfs index (else a plain pull)")
    p.add_argument("ref", help="registry reference, e.g. 127.0.0.1:5000/app:1")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="from a multi-arch index (default: this host's)")
    p.add_argument("--address", default="/run/containerd/containerd.sock", help="containerd's socket")
    p.add_argument("--namespace", default="default", help="containerd namespace (k8s.io for CRI)")
    p.add_argument("--snapshotter", default="lazyfs", help="the proxy plugin's name in containerd's config")
    p.add_argument("--json", action="store_true")

    p = add("tcmu", cmd_tcmu, "serve an image as a SCSI disk through target_core_user: attach IMAGE NAME | detach NAME")
    p.add_argument("action", choices=["attach", "detach"])
    p.add_argument("image", nargs="?", help="the image (attach only)")
    p.add_argument("name")
    p.add_argument("--writable", action="store_true")
    p.add_argument("--writable-root", metavar="DIR", help="where writable layers live (default from the config)")
    p.add_argument("--block-size", type=int, choices=[512, 4096], default=512)

    p = add("version", cmd_version, "show this lazyfs's version and that of the daemon answering on the run dir")
    p.add_argument("--json", action="store_true")

    p = add("doctor", cmd_doctor, "check the kernel and host for what lazyfs can use; exit 1 if lazyfs mount cannot work")
    p.add_argument("--json", action="store_true")

    for name, sp in sub.choices.items():
        sp.add_argument("--config", metavar="FILE", help="config file, TOML or JSON (default $LAZYFS_CONFIG, /etc/lazyfs/config.toml or .json)")
        if name in REGISTRY_COMMANDS:
            sp.add_argument("--plain-http", metavar="HOST:PORT", action="append",
                            help="talk plain HTTP to this registry (repeatable; only for trusted local registries)")
    return parser


# Commands that reach a registry, and so take --plain-http (and `config`, which shows its effect).
# Through the daemon (mount, export, commit TARGET REF, tcmu attach) the flag travels with the
# request; rpull refuses it, because the snapshotter fetches the layers with its own config.
# See docs/errors.md.
REGISTRY_COMMANDS = frozenset({"push", "pull", "convert", "index", "mount", "export", "commit", "tcmu", "rpull", "daemon",
                               "snapshotter", "config", "verify"})


_SUBJECT = {"pull": "ref", "rpull": "ref", "convert": "source", "index": "source", "umount": "target", "stats": "target"}


def error_line(args: argparse.Namespace, exc: BaseException) -> str:
    """The one line a failed command prints: what it was doing and to what, then the cause.

    The subject (the image, reference or target as typed) is named unless the message already does.
    """
    line = one_line(exc)
    subject = getattr(args, _SUBJECT.get(args.command, "image"), None) or getattr(args, "name", None)
    if subject and str(subject) not in line:
        action = f"{args.command} {args.action}" if args.command == "tcmu" else args.command
        line = f"{action} {subject}: {line}"
    return f"lazyfs: error: {line}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BaseException as raised:  # every failure is one line on stderr; --debug shows the traceback
        from lazyfs.nursery import single_error  # here: a command that succeeds never needs it (issue 14)

        exc = single_error(raised)
        if isinstance(exc, KeyboardInterrupt):
            return 130
        if args.debug or not isinstance(exc, Exception):
            raise exc
        if args.command == "daemon" and not isinstance(exc, LazyfsError):
            # a daemon's stderr is its log, read after the fact: keep a bug's traceback there
            import logging  # here, not at the top: the other commands' start skips it (issue 14)

            logging.getLogger("lazyfs.daemon").error("internal error", exc_info=exc)
        print(error_line(args, exc), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
