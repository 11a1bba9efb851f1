"""The ``signal-worker`` command line (entry point ``worker.cli.main:main``)."""

import os

# Decided here, before any module imports torch, because libgomp (torch's OpenMP runtime) reads its
# environment once, when it loads. After each parallel op an idle OpenMP thread spins for
# GOMP_SPINCOUNT iterations before it sleeps — by default 300,000, ~8 ms on the 2-core VM — and
# meanwhile holds a core that the denoiser's single-threaded lanes (worker/model/folded.py) and the
# event loop need: measured there, 16 symbols × 64 samples × 10 NFE with the 5-minute model took
# 245–257 ms with the default and 188–240 ms (median 202) with 20,000 (~0.5 ms of spinning), and
# the reference network path (many small two-thread ops back to back) was no slower. An explicit
# GOMP_SPINCOUNT or OMP_WAIT_POLICY in the environment wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "20000")
