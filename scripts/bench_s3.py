"""scripts/bench --s3: images in object storage, SeaweedFS on loopback (issue 14).

Started by scripts/bench after its own runs, with its Bench (the same alternation of compared
commands, cache drops, medians, wall/CPU/peak RSS).  Measures, in one run:

- `diskimg image` of the benchmark disk to s3:// against uploading the image file it made to
  the same server with the same client (boto3, multipart, 8 MiB parts, 4 at a time: diskimg's
  settings), and against `dd | restic backup --stdin` to the same server;
- `diskimg restore` from s3:// against downloading that file with the same client (ranged
  GETs, 8 MiB, 4 at a time) and against `restic dump | dd`;
- peak memory of `diskimg image` of a 4 TiB sparse source (the --sparse one) to s3://;
- in the same rounds, the same image made to a local file and the same restore from the local
  image file: the work that is diskimg's own, which no object store takes away (their ratios to
  the upload and the download are what the S3 goals can be at best on this machine).

The server (tests/s3servers.py: every port explicit, 127.0.0.1 only) is stopped whatever happens.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
# the server helper talks to the server with boto3, which the repository's .venv holds (the
# bench itself runs on the system's Python, with the standard library only)
sys.path += [str(p) for p in sorted((REPO / ".venv" / "lib").glob("python3*/site-packages"))]
from s3servers import SeaweedFS  # noqa: E402

MiB = 1 << 20
BUCKET = "bench"
GOALS = {"image": 1.1, "restore": 1.2}
RESTIC_PASSWORD = "diskimg-bench-not-secret"

# the same client settings as diskimg.store.s3 (part size, parts in flight, checksums)
UPLOAD = r"""
import sys, boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
path, bucket, key, mode = sys.argv[1:5]
c = boto3.client("s3", config=Config(request_checksum_calculation="when_required",
                 response_checksum_validation="when_required", s3={"addressing_style": "path"}))
t = TransferConfig(multipart_threshold=8 << 20, multipart_chunksize=8 << 20, max_concurrency=4)
if mode == "up":
    c.upload_file(path, bucket, key, Config=t)
else:
    c.download_file(bucket, key, path, Config=t)
"""


def _cpu_of(pid: int) -> float:
    """CPU seconds (user + system) process `pid` has used so far (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_s3(bench, diskimg: str, src: str, tgt: str, out_img: Path, reset_target, fsck_target,
           sparse: tuple[int, int] | None, make_sparse, log, backup: bool = False) -> list[str]:
    """Measure; return the report's lines.  With `backup` (``--backup --s3``), also a backup
    job whose destination is s3:// (issue 16)."""
    python = str(Path(diskimg).with_name("python"))
    server = SeaweedFS()
    saved = dict(os.environ)
    lines = ["", "### Object storage (--s3): SeaweedFS on loopback"]
    try:
        server.start()
        server.make_bucket(BUCKET)
        pid = server.proc.pid

        def weed() -> float:
            return _cpu_of(pid)
        os.environ.update(server.env())
        os.environ["RESTIC_PASSWORD"] = RESTIC_PASSWORD
        outdir = bench.outdir
        url = f"s3://{BUCKET}/images/disk.dimg"
        restic = shutil.which("restic")
        repo = f"s3:{server.endpoint}/{BUCKET}/restic"
        if restic:
            r = subprocess.run([restic, "-r", repo, "init"], capture_output=True, text=True)
            if r.returncode != 0:
                log(f"restic init failed: {r.stderr.strip()[-200:]}")
                restic = None
        log(f"SeaweedFS at {server.endpoint}; restic: {'yes' if restic else 'no'}")
        bench.measure_together([
            dict(key="s3_image", server_cpu=weed, label="diskimg image to s3://",
                 stages=[[diskimg, "image", src, url, "--force", "--no-progress"]]),
            dict(key="s3_upload", server_cpu=weed, label="upload the image file (boto3, same client)",
                 stages=[[python, "-c", UPLOAD, str(out_img), BUCKET, "upload/disk.dimg", "up"]]),
            # the same image made to a local file in the same rounds: what S3 adds is the rest
            dict(key="s3_image_local", label="diskimg image to a local file (the same image)",
                 stages=[[diskimg, "image", src, str(outdir / "local.dimg"), "--force",
                          "--no-progress"]],
                 after=lambda rec: (outdir / "local.dimg").unlink(missing_ok=True)),
            *([dict(key="s3_restic", server_cpu=weed, label="dd \\| restic backup --stdin",
                    stages=[["dd", f"if={src}", "bs=4M", "status=none"],
                            [restic, "-r", repo, "backup", "--stdin", "--stdin-filename",
                             "disk.img", "-q"]])] if restic else []),
        ])
        down = outdir / "download.dimg"
        bench.measure_together([
            *([dict(key="s3_restore", server_cpu=weed, label="diskimg restore from s3://",
                    stages=[[diskimg, "restore", url, tgt, "--yes", "--no-progress"]],
                    before=reset_target, after=fsck_target)] if bench.ok("s3_image") else []),
            dict(key="s3_download", server_cpu=weed, label="download the image file (boto3, same client)",
                 stages=[[python, "-c", UPLOAD, str(down), BUCKET, "upload/disk.dimg", "down"]],
                 after=lambda rec: down.unlink(missing_ok=True)),
            # the same restore from the local image file in the same rounds: the restore's own
            # work, which no object store can take away
            dict(key="s3_restore_local", label="diskimg restore of the same image from a local file",
                 stages=[[diskimg, "restore", str(out_img), tgt, "--yes", "--no-progress"]],
                 before=reset_target, after=fsck_target),
            *([dict(key="s3_restic_restore", server_cpu=weed, label="restic dump \\| dd conv=fsync",
                    stages=[[restic, "-r", repo, "dump", "latest", "disk.img"],
                            ["dd", f"of={tgt}", "bs=4M", "conv=fsync", "status=none"]],
                    before=reset_target, after=fsck_target)] if restic else []),
        ])
        if sparse is not None:
            ssize, sdata = sparse
            sfile = outdir / "sparse-s3.raw"
            log(f"writing a {ssize >> 30} GiB sparse file with {sdata // MiB} MiB of data")
            make_sparse(sfile, ssize, sdata)
            try:
                bench.measure("s3_sparse", f"diskimg image of a {ssize >> 30} GiB sparse file "
                                           f"to s3://",
                              [[diskimg, "image", str(sfile), f"s3://{BUCKET}/images/sparse.dimg",
                                "--force", "--no-progress"]], runs=1)
            finally:
                sfile.unlink(missing_ok=True)
        if backup and bench.ok("s3_image"):
            _backup_job(bench, diskimg, src, url, log)
        rows = []
        for key in ("s3_image", "s3_upload", "s3_image_local", "s3_restic", "s3_restore",
                    "s3_download", "s3_restore_local", "s3_restic_restore", "s3_sparse", "s3_backup_run", "s3_backup_image",
                    "s3_backup_list"):
            r = bench.results.get(key)
            if r is None:
                continue
            weed_cpu = f"{r['server_cpu']:.2f}" if "server_cpu" in r else ""
            rows.append(f"| {r['label']} | " + (
                f"{r['wall']:.2f} | {r['cpu']:.2f} | {weed_cpu} | {r['rss_mib']:.0f} |"
                if r["ok"] else f"FAILED: {r.get('error')} | | | |"))
        lines += ["", "| command | wall s | CPU s | server (weed) CPU s | peak RSS MiB |",
                  "|---|---|---|---|---|", *rows]
        lines += ["", "| diskimg / anchor | ratio | goal | met |", "|---|---|---|---|"]
        for what, a, b, goal in (("image to S3 vs uploading the file", "s3_image", "s3_upload",
                                  GOALS["image"]),
                                 ("image to S3 vs restic backup --stdin", "s3_image",
                                  "s3_restic", None),
                                 ("restore from S3 vs downloading the file", "s3_restore",
                                  "s3_download", GOALS["restore"]),
                                 ("restore from S3 vs restic dump \\| dd", "s3_restore",
                                  "s3_restic_restore", None),
                                 # the floors: the same work without the object store
                                 ("image to a local file vs uploading the file",
                                  "s3_image_local", "s3_upload", None),
                                 ("restore from a local file vs downloading the file",
                                  "s3_restore_local", "s3_download", None)):
            ra, rb = bench.results.get(a), bench.results.get(b)
            if not (ra and rb and ra["ok"] and rb["ok"]):
                lines.append(f"| {what} | — | {goal or ''} | n/a |")
                continue
            ratio = ra["wall"] / rb["wall"]
            met = ("yes" if ratio <= goal else "no") if goal else ""
            lines.append(f"| {what} | {ratio:.2f} | {'≤ %.1f' % goal if goal else ''} | {met} |")
        ra, rb = bench.results.get("s3_backup_run"), bench.results.get("s3_backup_image")
        if ra and rb and ra["ok"] and rb["ok"]:
            lines.append(f"| backup run to S3 vs image --incremental to S3 (unchanged disk) | "
                         f"{ra['wall'] / rb['wall']:.2f} | | |")
        # what the machine allows: the client and the server share its cores, so a command
        # takes at least (its CPU + the server's) / cores, however well it overlaps
        cores = os.cpu_count() or 1
        floors = []
        for what, a, b in (("image to S3", "s3_image", "s3_upload"),
                           ("restore from S3", "s3_restore", "s3_download")):
            ra, rb = bench.results.get(a), bench.results.get(b)
            if ra and rb and ra.get("ok") and rb.get("ok") and "server_cpu" in ra \
                    and "server_cpu" in rb:
                floor = (ra["cpu"] + ra["server_cpu"]) / cores
                anchor = (rb["cpu"] + rb["server_cpu"]) / cores
                floors.append(f"- {what}: (diskimg {ra['cpu']:.2f} + weed {ra['server_cpu']:.2f} "
                              f"CPU s) / {cores} cores = {floor:.2f} s at the least: "
                              f"{floor / rb['wall']:.2f}x the anchor's {rb['wall']:.2f} s wall "
                              f"is the best ratio this machine allows (the anchor's own floor: "
                              f"({rb['cpu']:.2f} + {rb['server_cpu']:.2f}) / {cores} = "
                              f"{anchor:.2f} s; under load both walls stretch, the floors "
                              f"do not)")
        if floors:
            lines += ["", f"CPU floor on this {cores}-core machine (client and server share it):",
                      *floors]
        s = bench.results.get("s3_sparse")
        if s and s["ok"]:
            lines.append(f"\nPeak RSS of `diskimg image` of a {sparse[0] >> 30} GiB sparse "
                         f"source to s3://: {s['rss_mib']:.0f} MiB (goal < 256 MiB: "
                         f"{'yes' if s['rss_mib'] < 256 else 'no'}), {s['wall']:.1f} s")
        return lines
    finally:
        os.environ.clear()
        os.environ.update(saved)
        server.stop()


def _backup_job(bench, diskimg: str, src: str, url: str, log) -> None:
    """`diskimg backup run` of an unchanged disk to s3:// (lock, claim object, catalogue read
    by ranged GETs, level policy, the incremental upload) against `diskimg image
    --incremental` of it to s3://, alternated; then `backup list` of the job's images."""
    outdir = bench.outdir
    conf = outdir / "jobs-s3.toml"
    conf.write_text(f'state-dir = "{outdir / "backup-s3-state"}"\n[jobs.bench]\n'
                    f'source = "{src}"\ndestination = "s3://{BUCKET}/jobs"\n'
                    f'full-every = "never"\nhealth = "ignore"\n')
    log("backup to s3://: the job's full image (not timed)")
    subprocess.run([diskimg, "backup", "run", "bench", "--level", "full", "--config", str(conf),
                    "--no-progress"], check=True, capture_output=True)
    inc = f"s3://{BUCKET}/images/inc.dimg"
    bench.measure_together([
        dict(key="s3_backup_run", label="diskimg backup run to s3:// (unchanged incremental)",
             stages=[[diskimg, "backup", "run", "bench", "--config", str(conf),
                      "--no-progress", "--json"]]),
        dict(key="s3_backup_image", label="diskimg image --incremental to s3:// (unchanged)",
             stages=[[diskimg, "image", src, inc, "--force", "--incremental", url,
                      "--no-progress", "--json"]]),
    ])
    bench.measure("s3_backup_list", "diskimg backup list (the job's images, by ranged GETs)",
                  [[diskimg, "backup", "list", "bench", "--config", str(conf), "--json"]])
