"""Pure scoring math: proper scoring rules (``rules``) and closed-form volatility baselines
(``baselines``). numpy/scipy/arch only: no torch, no Kafka, no Redis and no import of the
model-driven runs in ``worker.evaluation``, so the worker's online scorer can use it cheaply."""
