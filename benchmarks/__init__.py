"""Benchmarks of csp_kernels against the plain-PyTorch reference: `python -m benchmarks --help`.

Files: configs (what is measured), baselines (eager / checkpoint / compile / fused variants),
measure (one metric of one variant), roofline (GPU floors), suite (a whole run), targets
(docs/benchmarks.md's goals), records, report (table, JSON, CSV), plots (PNG), cli.
"""
