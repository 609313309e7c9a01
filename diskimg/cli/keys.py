"""``diskimg key``: the key slots of encrypted images (list, add, remove, change-passphrase)
and the master key as a paper key (export --paper).  Parsing only; ops.keys does the work."""
from __future__ import annotations

import argparse

from diskimg.cli.lazy import LazyModule, render
from diskimg.cli.options import common, key_options, read_new_passphrase, read_secret_file
from diskimg.errors import UsageError

keyops = LazyModule("diskimg.ops.keys")


def _new_secret_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("the new key")
    g.add_argument("--new-key-file", metavar="KF", help="a key file to open the new slot")
    g.add_argument("--new-passphrase", action="store_true",
                   help="ask for the new passphrase on the terminal (twice)")
    g.add_argument("--new-passphrase-file", metavar="FILE",
                   help="read the new passphrase from FILE (its first line)")


def _new_secret(args: argparse.Namespace, passphrase_only: bool = False) -> tuple[str, bytes]:
    given = [o for o in ("new_key_file", "new_passphrase", "new_passphrase_file")
             if getattr(args, o, None)]
    if len(given) != 1:
        raise UsageError("give the new key: one of --new-passphrase, --new-passphrase-file"
                         + ("" if passphrase_only else ", --new-key-file"))
    if args.new_key_file:
        from diskimg.cli.options import MIN_KEY_FILE
        data = read_secret_file(args.new_key_file, "key file")
        if len(data) < MIN_KEY_FILE:
            raise UsageError(f"{args.new_key_file}: a key file holds at least {MIN_KEY_FILE} "
                             f"bytes (make one: head -c 32 /dev/urandom > KF)")
        return "keyfile", data
    return "passphrase", read_new_passphrase(args.new_passphrase_file)


def _add_key(sub) -> None:
    p = sub.add_parser("key", parents=[common()], help="key slots of encrypted images",
                       description="List, add and remove the key slots of encrypted images, "
                                   "change a passphrase, or print the master key as a paper "
                                   "key.  Only the header's key slots are rewritten, in place; "
                                   "no block is.")
    ks = p.add_subparsers(dest="key_command", metavar="ACTION", required=True)

    def action(name: str, help_: str, many: bool = True) -> argparse.ArgumentParser:
        a = ks.add_parser(name, parents=[common()], help=help_, description=help_)
        a.add_argument("images", nargs="+" if many else None, metavar="IMAGE")
        a.add_argument("--json", action="store_true", help="print the result as JSON")
        return a

    a = action("list", "show the key slots of IMAGE (no key needed)")
    a.set_defaults(func=lambda args: render.KeyDone(keyops.list_slots(args.images)))
    a = action("add", "add a key slot for a new passphrase or key file")
    key_options(a)
    _new_secret_options(a)
    a.set_defaults(func=lambda args: render.KeyDone(keyops.add_slot(args.images,
                                                                    *_new_secret(args))))
    a = action("remove", "remove a key slot (never the last)")
    a.add_argument("--slot", type=int, required=True, metavar="N", help="the slot's id")
    key_options(a)
    a.set_defaults(func=lambda args: render.KeyDone(keyops.remove_slot(args.images, args.slot)))
    a = action("change-passphrase", "replace the passphrase slots the current passphrase "
                                    "opens by ones of a new passphrase")
    key_options(a)
    _new_secret_options(a)
    a.set_defaults(func=_cmd_change)
    a = action("export", "print the chain's master key (with --paper: as lines to write down "
                         "and type back with --paper-key)", many=False)
    a.add_argument("--paper", action="store_true", required=True,
                   help="as text a person can copy and type back, a checksum per line")
    key_options(a)
    a.set_defaults(func=lambda args: render.KeyDone(keyops.export_paper(args.images)))


def _cmd_change(args: argparse.Namespace):
    kind, secret = _new_secret(args, passphrase_only=True)
    if kind != "passphrase":
        raise UsageError("change-passphrase sets a passphrase: --new-passphrase or "
                         "--new-passphrase-file")
    return render.KeyDone(keyops.change_passphrase(args.images, secret))


ADDERS = [_add_key]
