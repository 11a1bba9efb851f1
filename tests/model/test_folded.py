"""The folded inference denoiser against the network as trained (``denoise_reference``): same
outputs (max abs difference <= 1e-5) on the shipped checkpoint and on random networks with the
5-minute model's shapes, whichever internal path (direct convolution, FFT, chunked, per-row steps)."""

from __future__ import annotations

import threading
from typing import cast

import numpy as np
import pytest
import torch

from worker.features.candles import CandleSeries
from worker.model import folded
from worker.model.checkpoint import load_checkpoint
from worker.model.forecaster import Forecaster, ForecastRequest
from worker.model.network import NetworkConfig, SSSDDenoiser
from worker.model.registry import CHECKPOINTS
from worker.model.s4d import clear_kernel_caches

TOL = 1e-5


def _random_model(cfg: NetworkConfig, seed: int = 0) -> SSSDDenoiser:
    """Random weights everywhere, including the output projection training zero-initialises and
    LayerNorm's affine (identity at initialisation), so every folded weight matters."""
    torch.manual_seed(seed)
    model = SSSDDenoiser(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() < 3:
                p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def _inputs(model: SSSDDenoiser, rows: int, context: int, seed: int = 1) -> tuple[torch.Tensor, ...]:
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(rows, context, cfg.bar_features, generator=g)
    ctime = torch.randn(rows, context, cfg.time_features, generator=g)
    ftime = torch.randn(rows, cfg.horizon, cfg.time_features, generator=g)
    x = torch.randn(rows, cfg.horizon, generator=g)
    with torch.inference_mode():
        cond = model.encode(feats, ctime)
    return x, cond, ftime


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def shipped(request: pytest.FixtureRequest) -> SSSDDenoiser:
    """Each shipped checkpoint (the 5-minute default and both hourly ones)."""
    return load_checkpoint(CHECKPOINTS[request.param]).model.eval()


@pytest.mark.parametrize("t", [0.0, 57.0, 199.0])
def test_shipped_checkpoint_denoise_equals_reference(shipped: SSSDDenoiser, t: float) -> None:
    x, cond, ftime = _inputs(shipped, rows=700, context=64)
    steps = torch.tensor([t]).expand(700)
    with torch.inference_mode():
        ref = shipped.denoise_reference(x, steps, cond, ftime)
        assert _max_diff(shipped.denoise(x, steps, cond, ftime), ref) <= TOL
        assert _max_diff(shipped.bind(cond, ftime)(x, steps), ref) <= TOL


@pytest.mark.parametrize("context", [64, 128])
def test_five_minute_shapes_equal_reference(context: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """48-bar path, the default widths; 400 rows = several chunks and a short last one."""
    model = _random_model(NetworkConfig(horizon=48), seed=context)
    rows = 400
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # chunking is only used on one thread
    x, cond, ftime = _inputs(model, rows=rows, context=context)
    per_chunk = folded.chunk_rows(rows, 48, torch.device("cpu"))
    assert rows > 2 * per_chunk and rows % per_chunk != 0
    bound = model.bind(cond, ftime)
    with torch.inference_mode():
        for t in (199.0, 120.0, 3.0):  # one bound call, several steps, as a sampler uses it
            steps = torch.tensor([t]).expand(rows)
            ref = model.denoise_reference(x, steps, cond, ftime)
            assert ref.abs().max() > 0.1  # the output depends on the input: the comparison is not vacuous
            assert _max_diff(bound(x, steps), ref) <= TOL


def test_a_different_step_per_row_equals_reference() -> None:
    model = _random_model(NetworkConfig(horizon=12, channels=16, state=8), seed=3)
    x, cond, ftime = _inputs(model, rows=9, context=20)
    steps = torch.arange(9).float() * 20
    with torch.inference_mode():
        assert _max_diff(model.denoise(x, steps, cond, ftime), model.denoise_reference(x, steps, cond, ftime)) <= TOL


def test_long_paths_keep_the_fft(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _random_model(NetworkConfig(horizon=40, channels=8, state=4), seed=4)
    x, cond, ftime = _inputs(model, rows=5, context=16)
    steps = torch.tensor([99.0]).expand(5)
    monkeypatch.setattr(folded, "FFT_ABOVE", 32)
    clear_kernel_caches(model)
    with torch.inference_mode():
        assert all(b.conv is None for b in model.plan(40).blocks)
        assert _max_diff(model.denoise(x, steps, cond, ftime), model.denoise_reference(x, steps, cond, ftime)) <= TOL


def test_training_and_autograd_use_the_reference() -> None:
    model = _random_model(NetworkConfig(horizon=6, channels=8, state=4), seed=5)
    x, cond, ftime = _inputs(model, rows=4, context=10)
    steps = torch.full((4,), 50.0)
    model.train()
    out = model.denoise(x, steps, cond.detach(), ftime)
    out.square().sum().backward()
    assert all(p.grad is not None for p in model.blocks.parameters())
    assert model._plan_cache == {}


def test_weight_changes_rebuild_the_folded_weights() -> None:
    model = _random_model(NetworkConfig(horizon=8, channels=8, state=4), seed=6)
    x, cond, ftime = _inputs(model, rows=6, context=10)
    steps = torch.full((6,), 80.0)
    with torch.inference_mode():
        before = model.denoise(x, steps, cond, ftime)
    with torch.no_grad():
        model.blocks[1].gate.weight.mul_(1.5)  # in place: the version counter moves
    with torch.inference_mode():
        after = model.denoise(x, steps, cond, ftime)
        assert _max_diff(after, model.denoise_reference(x, steps, cond, ftime)) <= TOL
        assert _max_diff(before, after) > 1e-3
    model.blocks[0].s4.c.data.mul_(2.0)  # through .data: only clear_kernel_caches notices
    clear_kernel_caches(model)
    with torch.inference_mode():
        assert _max_diff(model.denoise(x, steps, cond, ftime), model.denoise_reference(x, steps, cond, ftime)) <= TOL


def test_state_dict_layout_is_unchanged_and_shipped_weights_load(shipped: SSSDDenoiser) -> None:
    model = SSSDDenoiser(NetworkConfig(**shipped.cfg.to_dict()))
    with torch.inference_mode():
        x, cond, ftime = _inputs(shipped, rows=3, context=64)
        shipped.denoise(x, torch.full((3,), 5.0), cond, ftime)  # fills the plan cache
    assert set(shipped.state_dict()) == set(model.state_dict())
    assert not any("plan" in k or "cache" in k for k in shipped.state_dict())
    model.load_state_dict(shipped.state_dict(), strict=True)


def test_threads_each_keep_their_own_folded_weights() -> None:
    model = _random_model(NetworkConfig(horizon=8, channels=8, state=4), seed=7)
    x, cond, ftime = _inputs(model, rows=6, context=10)
    steps = torch.full((6,), 30.0)
    with torch.inference_mode():
        ref = model.denoise_reference(x, steps, cond, ftime)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with torch.inference_mode():
                for _ in range(60):
                    clear_kernel_caches(model)
                    assert _max_diff(model.bind(cond, ftime)(x, steps), ref) <= TOL
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[0]
    assert len(model._plan_cache) == 3  # one lane per thread


def test_workspaces_are_reused_per_thread_and_shape_but_outputs_are_never_overwritten(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The activations of a chunk live in buffers its thread reuses; what a call returns is its
    own: a second call (same shape, other inputs) leaves the first call's output as it was, and
    threads evaluating different inputs at once each get their own right answer."""
    model = _random_model(NetworkConfig(horizon=48, channels=16, state=8), seed=23)
    x, cond, ftime = _inputs(model, rows=40, context=30)
    steps = torch.tensor([77.0]).expand(40)
    cpu = torch.device("cpu")
    with torch.inference_mode():
        first = model.denoise(x, steps, cond, ftime)
        kept = first.clone()
        second = model.denoise(x * -0.5, steps, cond, ftime)
        assert torch.equal(first, kept)  # not overwritten by the second call
        assert _max_diff(second, model.denoise_reference(x * -0.5, steps, cond, ftime)) <= TOL
        assert _max_diff(first, model.denoise_reference(x, steps, cond, ftime)) <= TOL
    with torch.no_grad():  # the same buffers, made under inference mode, now written under no_grad
        assert _max_diff(model.denoise(x, steps, cond.clone(), ftime.clone()), first) <= TOL
    a = folded.workspace(16, 2, 48, 40, torch.float32, cpu)
    assert folded.workspace(16, 2, 48, 40, torch.float32, cpu) is a  # reused for the same shape
    assert folded.workspace(16, 2, 48, 39, torch.float32, cpu) is not a  # a shorter last chunk: its own
    assert bool((a.y1[16] == 1).all()) and bool((a.gates[:, 16] == 1).all())  # the bias rows
    seen: list[folded.Workspace] = []
    th = threading.Thread(target=lambda: seen.append(folded.workspace(16, 2, 48, 40, torch.float32, cpu)))
    th.start()
    th.join()
    assert seen[0] is not a  # another thread: other buffers
    # bounded: one bigger than the budget is never kept, and the budget clears the thread's set
    monkeypatch.setattr(folded, "WORKSPACE_BYTES_PER_THREAD", a.nbytes() + 1)
    big = folded.workspace(16, 2, 48, 80, torch.float32, cpu)
    assert folded.workspace(16, 2, 48, 80, torch.float32, cpu) is not big
    b = folded.workspace(16, 2, 48, 20, torch.float32, cpu)
    assert folded.workspace(16, 2, 48, 20, torch.float32, cpu) is b
    assert folded.workspace(16, 2, 48, 40, torch.float32, cpu) is not a  # dropped to make room for b

    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            with torch.inference_mode():
                for _ in range(30):
                    results[k] = model.denoise(x * (k + 1), steps, cond, ftime)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    with torch.inference_mode():
        for k, out in results.items():
            assert _max_diff(out, model.denoise_reference(x * (k + 1), steps, cond, ftime)) <= TOL


def test_bound_denoiser_refuses_another_batch_size() -> None:
    model = _random_model(NetworkConfig(horizon=8, channels=8, state=4), seed=8)
    x, cond, ftime = _inputs(model, rows=6, context=10)
    with torch.inference_mode(), pytest.raises(ValueError, match="bound to 6 rows"):
        model.bind(cond, ftime)(x[:4], torch.full((4,), 1.0))


def test_forecaster_samples_equal_the_reference_path(eurusd: CandleSeries) -> None:
    """The whole sampling call on the shipped checkpoint: fused DPM-Solver++ and folded network vs
    the diffusers scheduler and the network as trained, same noise."""
    from worker.dev.bench_model import reference_forecaster

    fc = Forecaster.load("eurusd-1h-v1", device="cpu")  # hourly weights for the hourly candles
    ref = reference_forecaster(fc)
    batch = fc.prepare([ForecastRequest(f"S{i}", eurusd[: 2990 + 97 * i]) for i in range(4)])
    assert batch.contexts is not None
    seeds = [11, 12, 13, 14]
    new, nfe = fc.sample(batch.contexts, seeds, num_samples=32, num_steps=10)
    old, nfe_ref = ref.sample(batch.contexts, seeds, num_samples=32, num_steps=10)
    assert nfe == nfe_ref == 10
    assert ref.scheduler == "dpmpp-diffusers"
    np.testing.assert_array_less(float((new - old).abs().max()), TOL)


def test_shipped_checkpoint_equals_todays_implementation_kernels_included(shipped: SSSDDenoiser) -> None:
    """Against today's code in full: reference network *and* the original S4D kernel formula."""
    from worker.dev.bench_model import ReferenceDenoiser

    x, cond, ftime = _inputs(shipped, rows=256, context=64)
    today = ReferenceDenoiser(shipped)
    with torch.inference_mode():
        for t in (199.0, 60.0, 1.0):
            steps = torch.tensor([t]).expand(256)
            assert _max_diff(shipped.bind(cond, ftime)(x, steps), today.denoise(x, steps, cond, ftime)) <= TOL


@pytest.fixture
def two_threads() -> object:
    """torch with two intra-op threads for the test (the project machine's default), then back."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _record_chunks(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """(thread name, torch threads in that thread) for every chunk folded.run evaluates."""
    seen: list[tuple[str, int]] = []
    inner = folded.run_chunk

    def recording(*args: torch.Tensor) -> torch.Tensor:
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return inner(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(folded, "run_chunk", recording)
    return seen


def test_lanes_equal_one_lane_and_the_reference(two_threads: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """With two intra-op threads the 48-bar chunks run on two single-threaded lanes of the pool;
    the output is the one-lane output and the reference's (≤ 1e-5)."""
    model = _random_model(NetworkConfig(horizon=48), seed=21)
    rows = 400
    x, cond, ftime = _inputs(model, rows=rows, context=64)
    with torch.inference_mode():
        clear_kernel_caches(model)
        plan = model.plan(48)
        bound = folded.bind_inputs(plan, cond, ftime)
        assert bound.lanes == 2
        assert len(bound.ft_proj) % 2 == 0 and len(bound.ft_proj) >= 4  # equal chunks, a multiple of the lanes
        assert bound.chunk_rows * len(bound.ft_proj) >= rows > bound.chunk_rows * (len(bound.ft_proj) - 1)
        seen = _record_chunks(monkeypatch)
        for t in (199.0, 3.0):
            steps = torch.tensor([t]).expand(rows)
            ref = model.denoise_reference(x, steps, cond, ftime)
            seen.clear()
            lanes = folded.run(model, plan, bound, x, steps)
            assert len(seen) == len(bound.ft_proj)
            assert all(name.startswith("denoise-lane") and threads == 1 for name, threads in seen), seen
            with monkeypatch.context() as m:  # the same chunks on the caller's thread, one after another
                m.setattr(torch, "get_num_threads", lambda: 1)
                seen.clear()
                one_lane = folded.run(model, plan, bound, x, steps)
                assert {name for name, _ in seen} == {threading.current_thread().name}
            # the same arithmetic up to float rounding: the caller's ops run on two threads, whose
            # reductions split the sums differently (a few ulps of outputs of magnitude ~5)
            assert _max_diff(lanes, one_lane) <= 1e-6 * max(1.0, float(ref.abs().max()))
            assert _max_diff(lanes, ref) <= TOL
            assert _max_diff(model.bind(cond, ftime)(x, steps), ref) <= TOL  # the public path, same lanes
    assert torch.get_num_threads() == 2  # the pool's threads did not change the caller's count ...
    fresh: list[int] = []
    th = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
    th.start()
    th.join()
    assert fresh == [2]  # ... nor the default a new thread starts with


def test_a_small_call_runs_on_the_lanes_too_and_one_row_on_the_callers_threads(
        two_threads: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """A call far under one chunk (one hourly symbol's 64 rows × 4 bars) is split between the lanes,
    whose ops do not wait at a barrier for a thread another process has descheduled; a call of
    fewer rows than lanes is one chunk on the caller's thread (with its two intra-op threads). Both
    equal the reference."""
    model = _random_model(NetworkConfig(horizon=4, channels=16, state=8), seed=24)
    x, cond, ftime = _inputs(model, rows=64, context=32)
    steps = torch.tensor([80.0]).expand(64)
    with torch.inference_mode():
        clear_kernel_caches(model)
        plan = model.plan(4)
        bound = folded.bind_inputs(plan, cond, ftime)
        assert (bound.lanes, bound.chunk_rows, len(bound.ft_proj)) == (2, 32, 2)
        seen = _record_chunks(monkeypatch)
        out = folded.run(model, plan, bound, x, steps)
        assert len(seen) == 2 and all(name.startswith("denoise-lane") and threads == 1 for name, threads in seen), seen
        assert _max_diff(out, model.denoise_reference(x, steps, cond, ftime)) <= TOL
        one = folded.bind_inputs(plan, cond[:1], ftime[:1])
        assert (one.lanes, one.chunk_rows, len(one.ft_proj)) == (1, 1, 1)
        seen.clear()
        out = folded.run(model, plan, one, x[:1], steps[:1])
        assert seen == [(threading.current_thread().name, 2)]
        assert _max_diff(out, model.denoise_reference(x[:1], steps[:1], cond[:1], ftime[:1])) <= TOL


def test_concurrent_callers_share_the_lanes_and_each_get_their_own_answer(two_threads: object) -> None:
    """Several micro-batches sample at once (the worker's executor threads): their evaluations share
    the pool's lanes, one task per lane each, and every caller gets its own rows' answer."""
    model = _random_model(NetworkConfig(horizon=48, channels=16, state=8), seed=25)
    rows = 500
    x, cond, ftime = _inputs(model, rows=rows, context=16)
    steps = torch.tensor([60.0]).expand(rows)
    with torch.inference_mode():
        assert folded.bind_inputs(model.plan(48), cond, ftime).lanes == 2
        refs = {k: model.denoise_reference(x * (1 + k / 4), steps, cond, ftime) for k in range(3)}
    results: dict[int, list[float]] = {k: [] for k in refs}
    errors: list[BaseException] = []
    start = threading.Barrier(len(refs))

    def caller(k: int) -> None:
        try:
            with torch.inference_mode():
                bound = model.bind(cond, ftime)
                start.wait()
                for _ in range(10):
                    results[k].append(_max_diff(bound(x * (1 + k / 4), steps), refs[k]))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(k,)) for k in refs]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[0]
    assert all(len(r) == 10 and max(r) <= TOL for r in results.values()), results


def test_a_different_step_per_row_on_the_lanes_equals_reference(two_threads: object) -> None:
    """Each chunk adds its own rows' step FiLM on its lane: with one step per row (not the samplers'
    shared step) every chunk must take its own rows' steps, not the first chunk's."""
    model = _random_model(NetworkConfig(horizon=48), seed=22)
    rows = 700
    x, cond, ftime = _inputs(model, rows=rows, context=64)
    steps = torch.linspace(0.0, 199.0, rows)
    with torch.inference_mode():
        clear_kernel_caches(model)
        bound = folded.bind_inputs(model.plan(48), cond, ftime)
        assert bound.lanes == 2 and len(bound.ft_proj) >= 4
        ref = model.denoise_reference(x, steps, cond, ftime)
        assert _max_diff(model.denoise(x, steps, cond, ftime), ref) <= TOL
        # and it is not the shared-step answer: the rows' steps differ enough to matter
        assert _max_diff(model.denoise(x, steps[:1].expand(rows), cond, ftime), ref) > 100 * TOL


def test_one_lane_when_already_single_threaded_on_a_gpu_or_on_the_fft_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lanes never nest (a backtest lane, or a lane of the pool, runs single-threaded ops), a GPU gets
    one chunk, and the FFT path (S4D kernels cached per thread) stays on the caller's thread."""
    model = _random_model(NetworkConfig(horizon=48, channels=16, state=8), seed=22)
    rows = 300
    x, cond, ftime = _inputs(model, rows=rows, context=32)
    steps = torch.tensor([50.0]).expand(rows)
    result: dict[str, object] = {}

    def single_threaded_lane() -> None:  # as a backtest lane runs it
        torch.set_num_threads(1)
        seen = _record_chunks(monkeypatch)
        with torch.inference_mode():
            clear_kernel_caches(model)
            plan = model.plan(48)
            bound = folded.bind_inputs(plan, cond, ftime)
            out = folded.run(model, plan, bound, x, steps)
            result.update(lanes=bound.lanes, chunk_rows=bound.chunk_rows, names={n for n, _ in seen},
                          today=folded.chunk_rows(rows, 48, torch.device("cpu")),  # one thread: cache-sized
                          me=threading.current_thread().name,
                          diff=_max_diff(out, model.denoise_reference(x, steps, cond, ftime)))

    th = threading.Thread(target=single_threaded_lane, name="backtest-lane")
    th.start()
    th.join()
    assert result["lanes"] == 1 and result["names"] == {"backtest-lane"}
    assert result["chunk_rows"] == result["today"] == folded.CHUNK_COLUMNS // 48  # today's chunks
    assert cast(float, result["diff"]) <= TOL

    with torch.inference_mode():
        plan = model.plan(48)
    assert folded.lane_count(plan, torch.device("cuda")) == 1
    assert folded.chunk_rows(rows, 48, torch.device("cuda"), lanes=1) == rows
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert folded.lane_count(plan, torch.device("cpu")) == 2
    monkeypatch.setattr(folded, "FFT_ABOVE", 32)
    clear_kernel_caches(model)
    with torch.inference_mode():
        fft_plan = model.plan(48)
    assert folded.lane_count(fft_plan, torch.device("cpu")) == 1
    assert folded.chunk_rows(rows, 48, torch.device("cpu"), lanes=1) == rows  # unchunked, as before lanes


def test_a_failing_lane_raises_in_the_caller(two_threads: object, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _random_model(NetworkConfig(horizon=48, channels=16, state=8), seed=23)
    x, cond, ftime = _inputs(model, rows=400, context=16)
    inner = folded.run_chunk
    calls = []

    def failing(*args: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("lane failed")
        return inner(*args)  # type: ignore[arg-type]

    with torch.inference_mode():
        bound = model.bind(cond, ftime)
        monkeypatch.setattr(folded, "run_chunk", failing)
        with pytest.raises(RuntimeError, match="lane failed"):
            bound(x, torch.full((400,), 9.0))
