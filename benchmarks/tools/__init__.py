"""Decision tools, outside CI: benchmarks that settled a design choice and are kept to re-run when that
choice is revisited (their results stay in benchmarks/results/, their commits in git).

- ``probe_kernel_ab.py``: two versions of the probe kernel side by side (same picks? CPU time ratio);
- ``probe_schedule.py``: successive-halving schedules replayed on recorded probe curves (the fast protocol);
- ``eval_overlap.py``: the evaluator's shared work queue against the earlier probes-after-encoding flow.
"""
