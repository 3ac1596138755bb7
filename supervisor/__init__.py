"""capvisor: a capability-based process sandbox supervisor for Linux.

Data flow (DESIGN.md §2), one module per step::

    description.py / tags.py   YAML with capability tags -> Description
    resolve.py                 Description -> LaunchPlan (open fds, compiled confinement)
      policy.py                  seccomp policy YAML -> BPF (pyseccomp)
      landlock.py, runtime.py    Landlock ruleset for the runtime set and mounts
    native.py                  LaunchPlan -> child (cffi helper: place fds, lock down, execve)
    process.py                 trio: wait on the pidfd, stop, run one program
    logs.py                    child pipes -> CRI-format log records
      logfile.py                 records -> log files: full disks, reopen, rotation
      logread.py                 log files -> lines (`capvisor logs`)
    cli.py                     the `capvisor` command
"""

__version__ = "0.1.0"
