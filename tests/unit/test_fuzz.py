"""A seeded fuzzer over small images: damage a full image or a link of a two-image chain (bit
flips, byte runs, truncation, and header or footer JSON crafted with its CRC recomputed so that
it gets past the CRC), then run `verify` and `restore` through cli.main in-process and check:

* no internal error (exit 3 "internal error") and no traceback, whatever the damage;
* `restore` exits 0 only when the restored file is byte-identical to the source;
* `verify` and `restore` agree: verify passes exactly when restore succeeds, except where
  verify says the damage does not affect the restore (a parent block the child overrides).

Deterministic (fixed seeds); a few hundred cases in well under a minute.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from helpers import cli, compressible
from imagecraft import footer_json, header_json, write_footer_json, write_header_json

# these tests damage or craft bytes at fixed places of the layout without parity
pytestmark = pytest.mark.usefixtures("no_default_parity")

BS = 64 * 1024
CASES = 600
SEED = 20261130

# values a crafted JSON field gets: wrong types, out of range, nested too deep
ODD_VALUES = [None, True, -1, 0, 1, 1 << 63, 1 << 64, 1.5, "", "x", [], {}, [[0, 1]], [1, 2],
              {"a": None}, "0" * 64, [[-1, 5]], [[0, 1 << 63]]]


def _source(rnd: random.Random, size: int) -> bytes:
    out = bytearray()
    for b in range(-(-size // BS)):
        n = min(BS, size - b * BS)
        pick = rnd.random()
        out += bytes(n) if pick < 0.3 else rnd.randbytes(n) if pick < 0.5 else \
            compressible(rnd, n)
    return bytes(out)


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> list[dict]:
    """Two image sets: a full image of a 70000-byte source, and a chain (full + incremental)
    of a 1 MiB + 1000-byte source; each with the bytes every image restores to."""
    rnd = random.Random(SEED)
    d = tmp_path_factory.mktemp("fuzz-src")
    out = []
    small = _source(rnd, 70000)
    (d / "small.raw").write_bytes(small)
    assert cli("image", d / "small.raw", d / "small.img", "--block-size", "64K").rc == 0
    out.append({"images": [d / "small.img"], "states": [small]})
    old = _source(rnd, (1 << 20) + 1000)
    (d / "src.raw").write_bytes(old)
    assert cli("image", d / "src.raw", d / "full.img", "--block-size", "64K").rc == 0
    new = bytearray(old)
    for b in (1, 6, 16):                      # 16 is the short last block
        new[b * BS + 5:b * BS + 50] = rnd.randbytes(45)
    (d / "src.raw").write_bytes(bytes(new))
    assert cli("image", d / "src.raw", d / "inc.img", "--incremental", d / "full.img").rc == 0
    out.append({"images": [d / "full.img", d / "inc.img"], "states": [old, bytes(new)]})
    return out


def _json_paths(obj, prefix=()) -> list[tuple]:
    """Every key path in a JSON document (objects and lists)."""
    paths = []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) \
        else ()
    for k, v in items:
        paths.append(prefix + (k,))
        paths += _json_paths(v, prefix + (k,))
    return paths


def _craft(rnd: random.Random, doc: dict) -> bytes:
    """`doc` with one field replaced, removed or added, or the whole of it replaced."""
    pick = rnd.random()
    if pick < 0.05:
        n = rnd.choice([1000, 200_000])
        return b"[" * n + b"]" * n
    if pick < 0.1:
        return json.dumps(rnd.choice(ODD_VALUES)).encode()
    paths = _json_paths(doc)
    path = rnd.choice(paths)
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    key = path[-1]
    if pick < 0.2 and isinstance(parent, dict):
        del parent[key]
    elif pick < 0.3 and isinstance(parent, dict):
        parent["new_" + str(key)] = rnd.choice(ODD_VALUES)   # an unknown key: ignored
    elif pick < 0.45 and isinstance(parent[key], int) and not isinstance(parent[key], bool):
        parent[key] += rnd.choice([-1, 1, 65536, -65536])    # plausible but wrong
    else:
        parent[key] = rnd.choice(ODD_VALUES)
    return json.dumps(doc, sort_keys=True).encode()


def _mutate(rnd: random.Random, path: Path) -> str:
    data = bytearray(path.read_bytes())
    pick = rnd.random()
    if pick < 0.3:
        for _ in range(rnd.randint(1, 3)):
            data[rnd.randrange(len(data))] ^= 1 << rnd.randrange(8)
        path.write_bytes(bytes(data))
        return "bit flip"
    if pick < 0.45:
        at = rnd.randrange(len(data))
        n = rnd.randint(1, 64)
        data[at:at + n] = rnd.choice([bytes(n), b"\xff" * n, rnd.randbytes(n)])
        path.write_bytes(bytes(data))
        return "byte run"
    if pick < 0.6:
        path.write_bytes(bytes(data[:rnd.randrange(len(data))]))
        return "truncation"
    if pick < 0.8:
        write_header_json(path, None, raw=_craft(rnd, header_json(path)))
        return "crafted header"
    write_footer_json(path, None, raw=_craft(rnd, footer_json(path)))
    return "crafted footer"


def _clean(res, what: str) -> None:
    text = res.out + res.err
    assert "Traceback" not in text, f"{what}: {text}"
    assert not (res.rc == 3 and "internal error" in res.err), f"{what}: {res.err}"
    assert res.rc in (0, 1, 2), f"{what}: exit {res.rc}: {res.err}"


def test_fuzz_verify_and_restore(sets, tmp_path):
    rnd = random.Random(SEED)
    seen: dict[str, int] = {}
    for case in range(CASES):
        s = rnd.choice(sets)
        work = tmp_path / f"c{case}"
        work.mkdir()
        images = [work / p.name for p in s["images"]]
        for src, dst in zip(s["images"], images):
            shutil.copy(src, dst)
        victim = rnd.choice(images)
        kind = _mutate(rnd, victim)
        leaf = images[-1]
        what = f"case {case}: {kind} of {victim.name}, leaf {leaf.name}"
        v = cli("verify", leaf, "--json", "--threads", "2")
        _clean(v, what + " (verify)")
        out = work / "out.raw"
        r = cli("restore", leaf, out, "--json", "--threads", "2")
        _clean(r, what + " (restore)")
        # a restore that only says some source bytes were unreadable (a crafted, valid
        # `unreadable` list) restored what the image holds
        restored = r.rc == 0 or (r.rc == 1 and r.out.strip().startswith("{")
                                 and json.loads(r.out).get("unreadable"))
        if restored:
            assert out.read_bytes() == s["states"][-1], f"{what}: wrong bytes restored"
        v_ok = v.rc == 0
        harmless = False
        if v.rc == 1 and v.out.strip().startswith("{"):
            report = json.loads(v.out)
            # damage verify says restore never reads; or only the footer's index digest,
            # which restore does not recompute (it checks every block's SHA-256 instead)
            harmless = report.get("errors_affecting_restore") == 0 or all(
                "index digest differs" in e["reason"] for e in report["errors"])
        if v_ok:
            assert restored, f"{what}: verify passed, restore failed: {r.err}"
        elif restored:
            assert harmless, f"{what}: restore succeeded, verify failed: {v.out}"
        seen[kind] = seen.get(kind, 0) + 1
        shutil.rmtree(work)
    assert len(seen) == 5, seen   # every kind of damage was tried
