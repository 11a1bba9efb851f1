"""S4D: the FFT convolution is the recurrence; the inference kernel cache never goes stale and never
leaks into checkpoints; FFTs stay in fp32 under autocast."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from worker.model.network import ResidualBlock
from worker.model.s4d import S4D, clear_kernel_caches


def _layer(channels: int = 6, state: int = 5, bidirectional: bool = False, seed: int = 0) -> S4D:
    """An S4D with randomised (not just initial) weights, so the test covers more than S4D-Lin."""
    torch.manual_seed(seed)
    layer = S4D(channels, state, bidirectional=bidirectional)
    with torch.no_grad():
        layer.log_a_real.add_(torch.randn_like(layer.log_a_real) * 0.5)
        layer.a_imag.add_(torch.randn_like(layer.a_imag))
        layer.log_dt.copy_(torch.empty_like(layer.log_dt).uniform_(math.log(1e-3), math.log(0.3)))
    return layer


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("length", [1, 17, 64])
def test_convolution_equals_recurrence(bidirectional: bool, length: int) -> None:
    layer = _layer(bidirectional=bidirectional, seed=length)
    u = torch.randn(3, layer.channels, length, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        conv = layer(u)
    rec = layer.recurrent(u)
    assert conv.shape == u.shape
    torch.testing.assert_close(conv, rec, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("length", [1, 4, 17, 48])
def test_toeplitz_matrix_is_the_fft_convolution(bidirectional: bool, length: int) -> None:
    """The direct convolution the folded denoiser uses: one (L x L) matrix per channel holding both
    directions and D, equal to the FFT path."""
    layer = _layer(bidirectional=bidirectional, seed=length + 100)
    u = torch.randn(3, layer.channels, length, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fft = layer(u)
        m = layer.toeplitz(length)
    assert m.shape == (layer.channels, length, length)
    direct = (u[:, :, None, :] @ m[None]).squeeze(2)
    torch.testing.assert_close(direct, fft, atol=1e-5, rtol=1e-5)
    if not bidirectional:  # causal: nothing below the diagonal
        assert torch.count_nonzero(torch.tril(m, diagonal=-1)) == 0


@pytest.mark.parametrize("bidirectional", [False, True])
def test_kernel_equals_the_original_complex64_formula(bidirectional: bool) -> None:
    from worker.model.checkpoint import load_checkpoint
    from worker.model.registry import CHECKPOINTS

    shipped = [m for path in CHECKPOINTS.values() for m in load_checkpoint(path).model.modules()
               if isinstance(m, S4D) and m.bidirectional == bidirectional]
    with torch.no_grad():
        for layer in [_layer(bidirectional=bidirectional, seed=9), *shipped]:
            for length in (1, 4, 48, 128):
                torch.testing.assert_close(layer.kernel(length), layer.kernel_reference(length), atol=1e-5, rtol=0)


def test_reference_kernels_switch_is_per_thread_and_keyed() -> None:
    from worker.model.s4d import reference_kernels

    layer = _layer(bidirectional=True, seed=10)
    with torch.no_grad():
        fast = layer.kernel(32)
        with reference_kernels():
            ref = layer.kernel(32)
        assert ref is not fast  # not served from the other formula's cache entry
        torch.testing.assert_close(ref, layer.kernel_reference(32))
        torch.testing.assert_close(layer.kernel(32), layer._kernel_values(32))


def test_unidirectional_layer_is_causal() -> None:
    layer = _layer()
    u = torch.randn(2, layer.channels, 40)
    v = u.clone()
    v[..., 25:] += torch.randn(2, layer.channels, 15)
    with torch.no_grad():
        torch.testing.assert_close(layer(u)[..., :25], layer(v)[..., :25], atol=1e-5, rtol=1e-5)


def test_gradients_flow_and_nothing_is_cached_while_training() -> None:
    layer = _layer()
    y = layer(torch.randn(2, layer.channels, 16)).square().sum()
    y.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())
    assert layer._kernel_cache == {}
    assert layer.kernel(16).requires_grad


# -- kernel cache ----------------------------------------------------------------------------------


def _fresh_output(layer: S4D, u: torch.Tensor) -> torch.Tensor:
    """The output of a cache-free copy of the layer with the same weights."""
    clone = S4D(layer.channels, layer.state, bidirectional=layer.bidirectional)
    clone.load_state_dict(layer.state_dict())
    with torch.no_grad():
        return clone(u)


def test_kernel_is_cached_under_no_grad_and_keyed_on_length() -> None:
    layer = _layer()
    with torch.no_grad():
        k1 = layer.kernel(32)
        assert layer.kernel(32) is k1  # reused, not recomputed
        k2 = layer.kernel(20)
        assert k2.shape[-1] == 20
        torch.testing.assert_close(k2, k1[..., :20])
    with torch.inference_mode():
        k3 = layer.kernel(32)
        assert layer.kernel(32) is k3


def test_cache_invalidated_by_load_state_dict() -> None:
    layer, other = _layer(seed=0), _layer(seed=1)
    u = torch.randn(2, layer.channels, 24)
    with torch.no_grad():
        before = layer(u)
        layer.load_state_dict(other.state_dict())
        after = layer(u)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, _fresh_output(other, u))


def test_cache_invalidated_by_optimizer_step() -> None:
    layer = _layer()
    u = torch.randn(2, layer.channels, 24)
    with torch.no_grad():
        layer(u)  # fills the cache
    opt = torch.optim.AdamW(layer.parameters(), lr=0.05)
    layer(u).square().sum().backward()
    opt.step()
    with torch.no_grad():
        torch.testing.assert_close(layer(u), _fresh_output(layer, u))


def test_cache_invalidated_by_in_place_change_under_no_grad() -> None:
    layer = _layer()
    u = torch.randn(2, layer.channels, 24)
    with torch.no_grad():
        layer(u)
        layer.c.mul_(2.0)
        layer.log_dt.add_(0.3)
        torch.testing.assert_close(layer(u), _fresh_output(layer, u))


@pytest.mark.parametrize("param", ["c", "log_dt"])
def test_cache_invalidated_by_in_place_change_through_data(param: str) -> None:
    """``p.data.mul_`` is how a lot of code (EMA updates, weight surgery, older optimisers) changes
    weights. ``.data`` has its own version counter, so a cache keyed on ``p._version`` misses it;
    every sampling call therefore starts with ``refresh_kernel_caches``, which compares the values
    and then calls ``clear_kernel_caches`` (see the forecaster tests)."""
    layer = _layer()
    u = torch.randn(2, layer.channels, 24)
    with torch.no_grad():
        before = layer(u)
        getattr(layer, param).data.mul_(1.5)
        clear_kernel_caches(layer)
        after = layer(u)
    expected = _fresh_output(layer, u)
    assert not torch.allclose(before, expected), "the weight change must matter"
    torch.testing.assert_close(after, expected, msg=f"stale S4D kernel after {param}.data.mul_")


def test_cache_invalidated_when_the_layer_moves_dtype() -> None:
    layer = _layer()
    u = torch.randn(2, layer.channels, 24)
    with torch.no_grad():
        ref = layer(u)
        layer.double()
        torch.testing.assert_close(layer(u.double()).float(), ref, atol=1e-5, rtol=1e-5)


def test_cache_never_in_state_dict_or_deepcopy_semantics() -> None:
    layer = _layer()
    expected_keys = {name for name, _ in layer.named_parameters()}
    with torch.no_grad():
        layer(torch.randn(1, layer.channels, 8))
    assert len(layer._kernel_cache) == 1
    assert set(layer.state_dict()) == expected_keys
    assert not any("cache" in k or "kernel" in k for k in layer.state_dict())
    assert all(isinstance(v, torch.Tensor) for v in layer.state_dict().values())
    # A copy with new weights must not serve the original's kernel.
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        twin.c.copy_(torch.randn_like(twin.c))
        u = torch.randn(1, layer.channels, 8)
        torch.testing.assert_close(twin(u), _fresh_output(twin, u))


# -- mixed precision ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bidirectional", [False, True])
def test_fft_runs_in_fp32_under_bf16_autocast(bidirectional: bool) -> None:
    layer = _layer(bidirectional=bidirectional)
    u = torch.randn(2, layer.channels, 50).bfloat16()  # 50: not a power of two
    with torch.no_grad():
        ref = layer(u.float())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(u)
        assert layer.kernel(50).dtype == torch.float32
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    # Only the final cast to bf16 may cost precision (8 mantissa bits: ~0.4 %).
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)


def test_residual_block_under_bf16_autocast_is_close_to_fp32() -> None:
    torch.manual_seed(0)
    block = ResidualBlock(8, 4, cond_dim=8, bidirectional=True, dropout=0.0).eval()
    x, cond = torch.randn(3, 20, 8), torch.randn(3, 8)
    with torch.no_grad():
        ref, ref_skip = block(x, cond)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, skip = block(x, cond)
    assert torch.isfinite(out).all() and torch.isfinite(skip).all()
    torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(skip.float(), ref_skip, rtol=5e-2, atol=5e-2)


def test_concurrent_sampling_threads_each_keep_their_own_kernel() -> None:
    """The worker samples batches in several executor threads at once, each clearing the cache at the
    start of its call: no thread may lose its kernel between check and read, or use another's."""
    import threading

    layer = _layer()
    u = torch.randn(2, layer.channels, 24)
    with torch.no_grad():
        ref = layer(u)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with torch.no_grad():
                for _ in range(150):
                    clear_kernel_caches(layer)
                    torch.testing.assert_close(layer(u), ref)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_a_thread_clearing_its_kernel_leaves_other_threads_kernels_alone() -> None:
    import threading

    layer = _layer()
    u = torch.randn(1, layer.channels, 16)
    with torch.no_grad():
        layer(u)
    mine = layer._kernel_cache[("cpu", threading.get_ident())]

    def other() -> None:
        with torch.no_grad():
            clear_kernel_caches(layer)  # the start of another sampling call, in another thread
            layer(u)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert len(layer._kernel_cache) == 2
    assert layer._kernel_cache[("cpu", threading.get_ident())] is mine
