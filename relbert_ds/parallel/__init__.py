"""Ranks: who we are (``distributed``: launcher discovery, the process group, ``agree`` on failures),
the one place that gathers (``collectives``) and the work queue the ranks share (``work_queue``).
Imports nothing of relbert_ds but ``errors``.
"""
