"""A job's source: found by its partition-table UUID (a GPT disk on a loop device), and a
filesystem made again on it starts a new full image instead of an incremental that imaging
would refuse."""
from __future__ import annotations

import pytest
from helpers import cli, run

pytestmark = pytest.mark.root


def test_source_by_ptuuid_and_a_new_filesystem_takes_a_full(loops, tmp_path):
    dev, _ = loops.create(16 << 20)
    run("sfdisk", "-q", dev, input="label: gpt\n,\n")
    ptuuid = run("blkid", "-p", "-o", "value", "-s", "PTUUID", dev).stdout.strip()
    assert ptuuid
    (tmp_path / "dest").mkdir()
    config = tmp_path / "jobs.toml"
    config.write_text(f"""
state-dir = "{tmp_path / 'state'}"
[jobs.gpt]
source = {{ ptuuid = "{ptuuid.upper()}" }}
destination = "{tmp_path / 'dest'}"
""")
    r = cli("backup", "run", "gpt", "--config", config, "--json")
    assert r.rc == 0, r.err
    assert r.json["source"] == dev and r.json["level"] == "full"
    # the same device, its partition table made again: a different disk to imaging
    run("sfdisk", "-q", dev, input="label: gpt\n,\n")
    config.write_text(config.read_text().replace(
        f'{{ ptuuid = "{ptuuid.upper()}" }}', f'"{dev}"'))
    import time
    time.sleep(1.1)
    r = cli("backup", "run", "gpt", "--config", config, "--json")
    assert r.rc == 0, r.err
    assert r.json["level"] == "full"
    assert r.json["reason"].startswith(f"{dev}: GPT disk GUID ")
    assert r.json["reason"].endswith("not the disk of the last full image")
    r = cli("backup", "run", "gpt", "--config", config, "--level", "incremental", "--json")
    assert r.rc == 0, r.err     # on the new full, an incremental is fine again
    # a name nothing answers to
    config.write_text(config.read_text().replace(f'"{dev}"', '{ ptuuid = "0000-none" }'))
    r = cli("backup", "run", "gpt", "--config", config)
    assert r.rc == 2 and "ptuuid 0000-none: no block device has this ptuuid now" in r.err
