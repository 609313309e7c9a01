"""Backup jobs: images made on a schedule, at the level a policy chooses, pruned by keep rules
that never break a chain, verified now and then, reported to monitoring.

- ``config``: the jobs file (TOML, read with tomllib) as frozen ``Job`` objects; every mistake
  is one line naming the file and the key;
- ``source``: a job's source as a stable name (a path, ``/dev/disk/by-id``, a serial, a WWN, a
  filesystem or partition-table UUID) resolved to today's device node through diskimg.devices;
- ``catalogue``: the images themselves are the catalogue: a destination (``Destination``: list,
  read headers, delete, small sidecar files) and the restore points read from its headers;
- ``policy``: which level the next run takes (full, differential, incremental) and its parent;
- ``retention``: restic's and Proxmox's keep rules, closed over the chains;
- ``runner``: ``run_job``, ``restore_job``, ``check_job``, ``prune_job``; the health gate, the
  lock (``lock``), the JSON status of each run;
- ``metrics``: node_exporter textfile metrics, written atomically;
- ``timer``: the systemd service and timer of a job.

Every function takes the clock as a parameter (``now``): the schedule is tested day by day
without faking the system's time.
"""
