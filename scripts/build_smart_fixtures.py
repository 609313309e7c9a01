#!/usr/bin/env python3
"""Build fixtures/smart/ from the recorded samples in ../shared/smart-samples (or SAMPLES=dir).

Each sample becomes a directory fixtures/smart/<ID>/ holding replay files for the fake smartctl
(tests/fake_smartctl.py), named like pySMART's own datasets: ``'_' + '_'.join(argv)`` with ``/``
replaced by ``_``, e.g. ``_-d_sat_--all__dev_sda``.  The files answer what a real smartctl would
print for *pySMART's* arguments, so samples recorded in another layout are converted:

* E* (``smartctl -x`` text): the ATA attribute table is turned from the ``-f brief`` layout into
  the ``-f old`` layout of ``smartctl --all``; "SMART Extended Self-test Log" becomes
  "SMART Self-test log"; the Extended Comprehensive Error Log keeps only its error count; sections
  ``--all`` does not print (log directory, SCT, device statistics, phy counters) are dropped.
  NVMe ``-x`` output is the ``--all`` output and is kept as recorded.
* S* (``smartctl --json``): rendered into ``--all`` text (ATA, NVMe, SCSI), or ``--scan-open`` text.
* P* (pySMART datasets): copied as recorded; P02's ``-d scsi --all`` recording holds only the
  text ``_-x__dev_sdb`` (an upstream mistake), so its ``-x`` recording answers that call.

The original of every sample is kept beside the replay files as ``source.*``; ``meta.json`` says
what device path and ``-d`` type the replay files were recorded for.  The converted files are
committed; rerun this script only when the samples or the converters change.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = Path(os.environ.get("SAMPLES", ROOT.parent / "shared" / "smart-samples"))
OUT = ROOT / "fixtures" / "smart"

FLAG_BITS = {"P": 0x01, "O": 0x02, "S": 0x04, "R": 0x08, "C": 0x10, "K": 0x20}
WHEN = {"-": "-", "NOW": "FAILING_NOW", "Past": "In_the_past"}
OLD_HEADER = ("ID# ATTRIBUTE_NAME          FLAG     VALUE WORST THRESH TYPE      UPDATED  "
              "WHEN_FAILED RAW_VALUE")
BRIEF_ROW = re.compile(r"^\s*(\d+)\s+(\S+)\s+([POSRCK-]{6})\s+(\d+)\s+(\d+)\s+(\S+)\s+(\S+)\s+(.*)$")
BANNER = ["smartctl 7.1 2020-06-20 r5066 [x86_64-linux] (local build)",
          "Copyright (C) 2002-19, Bruce Allen, Christian Franke, www.smartmontools.org", ""]


def key(argv: list[str]) -> str:
    return ("_" + "_".join(argv)).replace("/", "_")


def old_row(num: int, name: str, flags: int, value: int, worst: int, thresh: str, when: str,
            raw: str) -> str:
    kind = "Pre-fail" if flags & 0x01 else "Old_age"
    updated = "Always" if flags & 0x02 else "Offline"
    return (f"{num:3d} {name:<24}0x{flags:04x}   {value:03d}   {worst:03d}   {thresh:<3}    "
            f"{kind:<10}{updated:<9}{when:<12}{raw}")


def probe(dev: str, dtype: str, proto: str) -> str:
    return "\n".join(BANNER + [f"{dev}: Device of type '{dtype}' [{proto}] detected",
                               f"{dev}: Device of type '{dtype}' [{proto}] opened", ""])


# --------------------------------------------------------------------------------------------
# smartctl -x (ATA) -> smartctl --all

KEEP = ("SMART Self-test log", "SMART Selective self-test log", "SMART Error Log",
        "No self-tests have been logged", "Selective Self-tests/Logging not supported",
        "Warning")


def ata_x_to_all(text: str) -> str:
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    # everything up to the attribute table is what --all prints too
    while i < len(lines):
        line = lines[i]
        i += 1
        if line.startswith("ID# ATTRIBUTE_NAME") and "FLAGS" in line:
            out.append(OLD_HEADER)
            break
        if line.startswith("ID# ATTRIBUTE_NAME"):   # already -f old
            out.append(line)
            break
        out.append(line)
    while i < len(lines):
        line = lines[i]
        i += 1
        m = BRIEF_ROW.match(line)
        if m:
            num, name, fl, value, worst, thresh, fail, raw = m.groups()
            flags = sum(bit for ch, bit in FLAG_BITS.items() if ch in fl)
            out.append(old_row(int(num), name, flags, int(value), int(worst), thresh,
                               WHEN.get(fail, fail), raw.rstrip()))
            continue
        if "|" in line:          # the brief layout's flag legend
            continue
        if not line.strip():
            out.append("")
            break
        out.append(line)
    mode = "drop"
    prev_blank = True
    for line in lines[i:]:
        # section headers start at column 0; smartctl does not always put a blank line first
        known = line.startswith(("SMART Extended", "SMART Error Log", "SMART Self-test log",
                                 "SMART Selective", "General Purpose Log", "SCT ",
                                 "Device Statistics", "SATA Phy Event", "Pending Defects"))
        header = known or (prev_blank and line[:1].strip()
                           and not line.startswith(("Error ", "#")))
        prev_blank = not line.strip()
        if header:
            if line.startswith("SMART Extended Self-test Log"):
                out.append("SMART Self-test log structure revision number 1")
                mode = "keep"
                continue
            if line.startswith("SMART Extended Comprehensive Error Log"):
                out.append("SMART Error Log Version: 1")
                mode = "errlog"
                continue
            if line.startswith(KEEP):
                mode = "keep"
            elif mode == "errlog" and line.startswith(("Powered_Up_Time", "Device Error Count",
                                                         "No Errors Logged")):
                pass
            else:
                mode = "drop"
        if mode == "keep":
            out.append(line)
        elif mode == "errlog":
            m = re.match(r"Device Error Count: (\d+)", line)
            if m:
                out.append(f"ATA Error Count: {m.group(1)} (device log contains only the most "
                           "recent five errors)")
                out.append("")
            elif line.startswith("No Errors Logged"):
                out += [line, ""]
    while out and not out[-1].strip():
        out.pop()
    return "\n".join(out) + "\n\n"


# --------------------------------------------------------------------------------------------
# smartctl --json -> smartctl --all

def _cap(d: dict) -> str:
    b = d.get("user_capacity", {}).get("bytes")
    return f"{b:,} bytes [{b / 1e9:.0f} GB]" if b else ""


def json_to_all(d: dict) -> str:
    out = list(BANNER) + ["=== START OF INFORMATION SECTION ==="]
    proto = d.get("device", {}).get("protocol")
    if proto == "ATA":
        if d.get("model_family"):
            out.append(f"Model Family:     {d['model_family']}")
        out.append(f"Device Model:     {d.get('model_name', '')}")
        out.append(f"Serial Number:    {d.get('serial_number', '')}")
        w = d.get("wwn")
        if w:
            out.append(f"LU WWN Device Id: {w['naa']:x} {w['oui']:06x} {w['id']:09x}")
        out.append(f"Firmware Version: {d.get('firmware_version', '')}")
        if d.get("ata_additional_product_id"):
            out.append(f"Add. Product Id:  {d['ata_additional_product_id']}")
        out.append(f"User Capacity:    {_cap(d)}")
        out.append(f"Sector Sizes:     {d.get('logical_block_size', 512)} bytes logical, "
                   f"{d.get('physical_block_size', 512)} bytes physical")
        rr = d.get("rotation_rate")
        out.append("Rotation Rate:    " + ("Solid State Device" if rr == 0 else f"{rr} rpm"))
        out += ["SMART support is: Available - device has SMART capability.",
                "SMART support is: Enabled", "", "=== START OF READ SMART DATA SECTION ==="]
        passed = d.get("smart_status", {}).get("passed")
        out.append("SMART overall-health self-assessment test result: "
                   + ("PASSED" if passed else "FAILED!"))
        for msg in d.get("smartctl", {}).get("messages", []) or []:
            out.append(msg["string"])
        out += ["", "General SMART Values:"]
        st = d.get("ata_smart_data", {}).get("self_test", {}).get("status", {})
        out.append(f"Self-test execution status:      ({st.get('value', 0):4d})\t"
                   f"{st.get('string', 'completed without error')}")
        out += ["", "SMART Attributes Data Structure revision number: 16",
                "Vendor Specific SMART Attributes with Thresholds:", OLD_HEADER]
        for a in d.get("ata_smart_attributes", {}).get("table", []):
            when = {"": "-", "now": "FAILING_NOW", "past": "In_the_past"}.get(
                a.get("when_failed", ""), a.get("when_failed"))
            out.append(old_row(a["id"], a["name"], a["flags"]["value"], a["value"], a["worst"],
                               f"{a['thresh']:03d}", when, a["raw"]["string"]))
        out.append("")
        err = d.get("ata_smart_error_log", {}).get("summary", {})
        out.append("SMART Error Log Version: 1")
        if err.get("count"):
            out += [f"ATA Error Count: {err['count']}", ""]
        else:
            out += ["No Errors Logged", ""]
        log = d.get("ata_smart_self_test_log", {}).get("standard", {})
        if log.get("table"):
            out += ["SMART Self-test log structure revision number 1",
                    "Num  Test_Description    Status                  Remaining  "
                    "LifeTime(hours)  LBA_of_first_error"]
            for n, t in enumerate(log["table"], 1):
                status = t["status"]["string"]
                rem = t["status"].get("remaining_percent", 0)
                lba = t.get("lba", "-")
                out.append(f"#{n:2d}  {t['type']['string']:<18}  {status:<29} {rem:3d}%  "
                           f"{t['lifetime_hours']:8d}         {lba}")
        else:
            out.append("No self-tests have been logged.  [To run self-tests, use: smartctl -t]")
        out.append("")
    elif proto == "NVMe":
        out.append(f"Model Number:                       {d.get('model_name', '')}")
        out.append(f"Serial Number:                      {d.get('serial_number', '')}")
        out.append(f"Firmware Version:                   {d.get('firmware_version', '')}")
        out.append(f"Total NVM Capacity:                 {_cap(d)}")
        out += ["", "=== START OF SMART DATA SECTION ==="]
        passed = d.get("smart_status", {}).get("passed")
        out.append("SMART overall-health self-assessment test result: "
                   + ("PASSED" if passed else "FAILED!"))
        h = d["nvme_smart_health_information_log"]
        out += ["", "SMART/Health Information (NVMe Log 0x02)",
                f"Critical Warning:                   0x{h['critical_warning']:02x}",
                f"Temperature:                        {h['temperature']} Celsius",
                f"Available Spare:                    {h['available_spare']}%",
                f"Available Spare Threshold:          {h['available_spare_threshold']}%",
                f"Percentage Used:                    {h['percentage_used']}%",
                f"Data Units Read:                    {h['data_units_read']}",
                f"Data Units Written:                 {h['data_units_written']}",
                f"Host Read Commands:                 {h['host_reads']}",
                f"Host Write Commands:                {h['host_writes']}",
                f"Controller Busy Time:               {h['controller_busy_time']}",
                f"Power Cycles:                       {h['power_cycles']}",
                f"Power On Hours:                     {h['power_on_hours']}",
                f"Unsafe Shutdowns:                   {h['unsafe_shutdowns']}",
                f"Media and Data Integrity Errors:    {h['media_errors']}",
                f"Error Information Log Entries:      {h['num_err_log_entries']}",
                f"Warning  Comp. Temperature Time:    {h.get('warning_temp_time', 0)}",
                f"Critical Comp. Temperature Time:    {h.get('critical_comp_time', 0)}"]
        for n, t in enumerate(h.get("temperature_sensors", []), 1):
            out.append(f"Temperature Sensor {n}:               {t} Celsius")
        out.append("")
    else:  # SCSI
        out.append(f"Vendor:               {d.get('vendor', '')}")
        out.append(f"Product:              {d.get('product', '')}")
        out.append(f"Revision:             {d.get('revision', '')}")
        out.append(f"User Capacity:        {_cap(d)}")
        out.append(f"Logical block size:   {d.get('logical_block_size', 512)} bytes")
        out.append(f"Serial number:        {d.get('serial_number', '')}")
        out.append(f"Device type:          {d.get('device_type', {}).get('name', 'disk')}")
        if "smart_status" not in d:
            out += ["SMART support is:     Unavailable - device lacks SMART capability.", "",
                    "=== START OF READ SMART DATA SECTION ==="]
            t = d.get("temperature", {})
            out += [f"Current Drive Temperature:     {t.get('current', 0)} C",
                    f"Drive Trip Temperature:        {t.get('drive_trip', 0)} C", "",
                    "Error Counter logging not supported", "",
                    "Device does not support Self Test logging", ""]
            return "\n".join(out) + "\n"
        out += ["Transport protocol:   SAS (SPL-3)",
                "SMART support is:     Available - device has SMART capability.",
                "SMART support is:     Enabled", "", "=== START OF READ SMART DATA SECTION ==="]
        out.append("SMART Health Status: " + ("OK" if d["smart_status"]["passed"] else "FAILURE"))
        t = d.get("temperature", {})
        out += ["", f"Current Drive Temperature:     {t.get('current', 0)} C",
                f"Drive Trip Temperature:        {t.get('drive_trip', 0)} C", ""]
        p = d.get("power_on_time", {})
        if p:
            out.append(f"Accumulated power on time, hours:minutes {p.get('hours', 0)}:"
                       f"{p.get('minutes', 0):02d}")
        out += [f"Elements in grown defect list: {d.get('scsi_grown_defect_list', 0)}", "",
                "Error counter log:",
                "           Errors Corrected by           Total   Correction     Gigabytes    Total",
                "               ECC          rereads/    errors   algorithm      processed    uncorrected",
                "           fast | delayed   rewrites  corrected  invocations   [10^9 bytes]  errors"]
        for op, c in d.get("scsi_error_counter_log", {}).items():
            out.append(f"{op + ':':<8}{c['errors_corrected_by_eccfast']:>10} "
                       f"{c['errors_corrected_by_eccdelayed']:>8} "
                       f"{c['errors_corrected_by_rereads_rewrites']:>8} "
                       f"{c['total_errors_corrected']:>10} "
                       f"{c['correction_algorithm_invocations']:>10} "
                       f"{float(c['gigabytes_processed']):>14.3f} "
                       f"{c['total_uncorrected_errors']:>10}")
        out += ["", "No Self-tests have been logged", ""]
    return "\n".join(out) + "\n"


def json_scan_to_text(d: dict) -> str:
    return "".join(f"{x['name']} -d {x['type']} # {x['info_name']}, {x['protocol']} device\n"
                   for x in d["devices"])


# --------------------------------------------------------------------------------------------

def write(dirpath: Path, name: str, text: str) -> None:
    (dirpath / name).write_text(text)


def build() -> None:
    index = json.loads((SAMPLES / "index.json").read_text())
    rows = index if isinstance(index, list) else index.get("samples", index.get("rows"))
    if OUT.exists():
        for d in OUT.iterdir():
            if d.is_dir():
                shutil.rmtree(d)
    OUT.mkdir(parents=True, exist_ok=True)
    for row in rows:
        sid = row["id"]
        src = SAMPLES / row["file"]
        d = OUT / sid
        d.mkdir()
        meta = {"id": sid, "type": row["device_type"], "model": row["model"],
                "notable": row["notable"], "source": row["source"],
                "source_path": row.get("source_path"), "licence": row.get("licence")}
        if sid.startswith("E"):
            text = src.read_text()
            shutil.copy(src, d / "source-x.txt")
            if row["device_type"] == "nvme":
                dev, dtype = "/dev/nvme0", "nvme"
                write(d, key(["-d", "test", dev]), probe(dev, "nvme", "NVMe"))
                write(d, key(["-d", "nvme", "--all", dev]), text)
            else:
                dev, dtype = "/dev/sda", "sat"
                write(d, key(["-d", "test", dev]), probe(dev, "sat", "ATA"))
                write(d, key(["-d", "sat", "--all", dev]), ata_x_to_all(text))
            meta.update(device=dev, interface=None, probe=dtype)
        elif sid.startswith("S"):
            data = json.loads(src.read_text())
            shutil.copy(src, d / "source.json")
            if "devices" in data:
                write(d, key(["--scan-open"]), json_scan_to_text(data))
                meta.update(device=None, interface=None, probe=None)
            else:
                dev = data["device"]["name"]
                dtype = data["device"]["type"]
                interface = dtype if "megaraid" in dtype else None
                text = json_to_all(data)
                proto = {"ATA": "ATA", "NVMe": "NVMe", "SCSI": "SCSI"}[data["device"]["protocol"]]
                if interface is None:
                    write(d, key(["-d", "test", dev]), probe(dev, dtype, proto))
                # pySMART leaves out -d for types it does not know (usbjmicron)
                known = dtype in ("sat", "nvme", "scsi", "ata") or "megaraid" in dtype
                write(d, key((["-d", dtype] if known else []) + ["--all", dev]), text)
                meta.update(device=dev, interface=interface, probe=dtype)
        else:
            for f in src.iterdir():
                if f.name in ("device.json", "notes.txt"):
                    shutil.copy(f, d / ("source-" + f.name))
                else:
                    shutil.copy(f, d / f.name)
            meta.update(_pysmart_meta(sid, d))
            if sid == "P02":
                shutil.copy(d / "_-x__dev_sdb", d / "_-d_scsi_--all__dev_sdb")
        (d / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        print(f"{sid}: {meta['device']} ({meta.get('interface') or meta.get('probe')})")


def _pysmart_meta(sid: str, d: Path) -> dict:
    """Which device path and -d type pySMART's recordings were made for."""
    names = [f.name for f in d.iterdir()]
    probe_files = [n for n in names if n.startswith("_-d_test__dev_")]
    all_files = sorted(n for n in names if "_--all_" in n and n.startswith("_-d_"))
    if sid == "P10":
        return {"device": None, "interface": None, "probe": None,
                "devices": [["/dev/nvme0", "nvme"], ["/dev/nvme1", "nvme"],
                            ["/dev/bus/0", "sat+megaraid,60"]]}
    f = all_files[0]
    m = re.match(r"_-d_(.+?)_--all_(_dev_.+)$", f)
    dtype, devkey = m.group(1), m.group(2)
    dev = {"_dev_bus_7": "/dev/bus/7"}.get(devkey, devkey.replace("_", "/"))
    return {"device": dev, "interface": None if probe_files else dtype, "probe": dtype}


# --------------------------------------------------------------------------------------------
# self-test sequences, derived from E01 (a healthy WD Purple with 18 logged self-tests)

IDLE = ("Self-test execution status:      (   0)\tThe previous self-test routine completed\n"
        "\t\t\t\t\twithout error or no self-test has ever \n\t\t\t\t\tbeen run.")
RUNNING = ("Self-test execution status:      ( 2{r:02d})\tSelf-test routine in progress...\n"
           "\t\t\t\t\t{r}0% of test remaining.")
STARTED = """=== START OF OFFLINE IMMEDIATE AND SELF-TEST SECTION ===
Sending command: "Execute SMART Short self-test routine immediately in off-line mode".
Drive command "Execute SMART Short self-test routine immediately in off-line mode" successful.
Testing has begun.
Please wait 2 minutes for test to complete.
Test will complete after Mon Jan  1 00:02:00 2024
Use smartctl -X to abort test.
"""
ABORTED = """=== START OF OFFLINE IMMEDIATE AND SELF-TEST SECTION ===
Sending command: "Abort SMART off-line mode self-testing routine".
Self-testing aborted!
"""


def _with_log_entry(text: str, entry: str) -> str:
    """The --all text with ``entry`` as the newest self-test (#1) and the others renumbered."""
    out = []
    for line in text.splitlines():
        m = re.match(r"^#\s*(\d+)(\s.*)$", line)
        if m:
            if int(m.group(1)) == 1:
                out.append(f"# 1{entry}")
            n = int(m.group(1)) + 1
            line = f"#{n:2d}{m.group(2)}"
        out.append(line)
    return "\n".join(out) + "\n"


def build_selftests() -> None:
    base = (OUT / "E01" / "_-d_sat_--all__dev_sda").read_text()
    assert IDLE in base
    dev = "/dev/sda"
    outcomes = {
        "selftest-ok": "  Short offline       Completed without error       00%     41846         -",
        "selftest-fail": "  Short offline       Completed: read failure       90%     41846         "
                         "123456789",
    }
    for name, entry in outcomes.items():
        d = OUT / name
        d.mkdir()
        write(d, key(["-d", "test", dev]), probe(dev, "sat", "ATA"))
        allkey = key(["-d", "sat", "--all", dev])
        # 1: Device() reads it; 2: run_selftest() checks nothing runs; 3, 4: progress; 5: done
        write(d, allkey + ".1", base)
        write(d, allkey + ".2", base)
        write(d, allkey + ".3", base.replace(IDLE, RUNNING.format(r=9)))
        write(d, allkey + ".4", base.replace(IDLE, RUNNING.format(r=4)))
        write(d, allkey + ".5", _with_log_entry(base, entry))
        write(d, key(["-d", "sat", "-t", "short", dev]), STARTED)
        write(d, key(["-d", "sat", "-X", dev]), ABORTED)
        (d / "meta.json").write_text(json.dumps({
            "id": name, "device": dev, "interface": None, "probe": "sat",
            "source": "derived from E01 (linuxhw/EnterpriseDrive, CC-BY-4.0)",
            "notable": "self-test sequence: idle, idle, 90% remaining, 40% remaining, finished"
        }, indent=2) + "\n")
        print(f"{name}: {dev} (sequence)")


if __name__ == "__main__":
    if not SAMPLES.is_dir():
        sys.exit(f"no samples at {SAMPLES}")
    build()
    build_selftests()
