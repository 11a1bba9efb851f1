"""Model-driven offline evaluation: the backtest (the worker's batched path over candles), the
``evaluate`` / ``compare-schedulers`` reports and their plots. The scoring rules and baselines they
use are the pure package :mod:`worker.scoring`."""
