"""The ``lqframe`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from lqframe.errors import LqframeError


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*(str(c) for c in r)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def cmd_plugins(args: argparse.Namespace) -> int:
    from lqframe.registry import BLOCK_ENV, option_defaults, registry

    reg = registry()
    if args.json:
        entries = []
        for info in reg.components():
            entry = info.as_dict()
            entry["options"] = {k: v for k, v in option_defaults(info.cls).items()}
            entries.append(entry)
        entries += [f.as_dict() for f in reg.failures]
        entries += [{"kind": "blocked", "name": name, "plugin": name, "distribution": None, "version": None}
                    for name in reg.blocked]
        print(json.dumps(entries, indent=2, default=str))
        return 0
    rows = [[i.kind, i.name, i.plugin, i.distribution or "-", i.version or "-"] for i in reg.components()]
    print(_table(rows, ["kind", "name", "plugin", "distribution", "version"]))
    if reg.failures:
        print("\nplugins that failed to load:")
        for f in reg.failures:
            print(f"  {f.plugin} ({f.distribution or 'no distribution'} {f.version or ''}) "
                  f"failed at {f.stage}: {f.error}".replace("  failed", " failed"))
    if reg.blocked:
        print(f"\nblocked by {BLOCK_ENV}: {', '.join(reg.blocked)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from lqframe import __version__

    parser = argparse.ArgumentParser(
        prog="lqframe",
        description="Compress language models into packed low-bit weights plus low-rank terms (W ≈ Q + L·R).",
    )
    parser.add_argument("--version", action="version", version=f"lqframe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("plugins", help="list registered components and plugins that failed to load")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plugins)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except LqframeError as exc:
        print(f"lqframe: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lqframe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
