"""The lazyfs command line: parses arguments and calls the library. No logic lives here."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

import trio

from lazyfs.errors import ConfigError, LazyfsError

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


def cmd_create(args: argparse.Namespace) -> int:
    from lazyfs.image.local import create_image

    result = trio.run(lambda: create_image(
        _local(args.image), size=args.size, from_file=args.from_file, from_dir=args.from_dir,
        base=_local(args.base) if args.base else None, chunk_size=args.chunk_size))
    _print(result, args.json)
    return 0


def cmd_commit(args: argparse.Namespace) -> int:
    from lazyfs.image.local import commit_image

    result = trio.run(commit_image, _local(args.image), args.writable, _local(args.out), args.chunk_size)
    _print(result, args.json)
    return 0


def cmd_writable(args: argparse.Namespace) -> int:
    from lazyfs.image.local import new_writable

    print(trio.run(new_writable, _local(args.image), args.directory, args.kind))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from lazyfs.image.local import image_info

    _print(trio.run(image_info, _local(args.image)), args.json)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from lazyfs.image.local import verify_image

    problems = trio.run(verify_image, _local(args.image))
    for problem in problems:
        print(f"BAD {problem}")
    if problems:
        print(f"lazyfs: {len(problems)} problem(s) in {args.image}", file=sys.stderr)
        return 1
    print(f"{args.image}: every blob and chunk digest matches")
    return 0


def cmd_flatten(args: argparse.Namespace) -> int:
    from lazyfs.image.local import flatten_image

    size = trio.run(flatten_image, _local(args.image), args.out)
    print(f"{args.out}: {size} bytes")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lazyfs", description="Lazy-loading block-layer images for containers and VMs.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
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

    p = add("commit", cmd_commit, "turn a writable layer over IMAGE into a new image OUT")
    p.add_argument("image")
    p.add_argument("writable", help="the writable layer directory")
    p.add_argument("out")
    p.add_argument("--chunk-size", **chunk)
    p.add_argument("--json", action="store_true")

    p = add("writable", cmd_writable, "create an empty writable layer over IMAGE in DIRECTORY")
    p.add_argument("image")
    p.add_argument("directory")
    p.add_argument("--kind", choices=["sparse", "log"], default="sparse")

    p = add("info", cmd_info, "show layers, sizes, chunks, holes and the dedup ratio")
    p.add_argument("image")
    p.add_argument("--json", action="store_true")

    p = add("verify", cmd_verify, "check every blob and chunk digest; exit 1 on any mismatch")
    p.add_argument("image")

    p = add("flatten", cmd_flatten, "write the merged device to a raw file")
    p.add_argument("image")
    p.add_argument("out")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LazyfsError as exc:
        if args.debug:
            raise
        print(f"lazyfs: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        if args.debug:
            raise
        print(f"lazyfs: error: {exc.strerror or exc}{': ' + exc.filename if exc.filename else ''}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
