"""The streaming factors (SPEC §2) against exact float64 sums (`math.fsum`).

A product of two float32 (or bfloat16) numbers is exact in float64, so
`fsum` over the products is the correctly rounded exact sum.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lora_da


def exact_gram(rows: list[np.ndarray]) -> np.ndarray:
    x = np.concatenate([np.asarray(r, dtype=np.float64) for r in rows])
    n = x.shape[1]
    out = np.empty((n, n))
    for i in range(n):
        for j in range(i + 1):
            out[i, j] = out[j, i] = math.fsum(x[:, i] * x[:, j])
    return out


def rel_err(a, b):
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), np.finfo(float).tiny)


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    return (np.ascontiguousarray(x, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)


def from_bf16_bits(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


@st.composite
def streams(draw):
    n = draw(st.integers(1, 24))
    batches = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(batches):
        t = draw(st.integers(0, 300))
        # magnitudes over many decades, per feature and per token
        scale = 10.0 ** rng.uniform(-6, 6, size=(t, 1)) * 10.0 ** rng.uniform(-3, 3, size=(1, n))
        out.append((rng.standard_normal((t, n)) * scale).astype(np.float32))
    return n, out


@settings(max_examples=60, deadline=None)
@given(streams())
def test_input_factor_matches_exact_sum(stream):
    n, batches = stream
    f = lora_da.InputFactor(n)
    for b in batches:
        f.add(b)
    T = sum(b.shape[0] for b in batches)
    assert f.tokens == T
    if T == 0:
        return
    exact = exact_gram(batches)
    Z = f.mean()
    assert rel_err(Z * T, exact) <= 1e-12
    np.testing.assert_array_equal(Z, Z.T)


PANEL = 96  # the kernel's column panel (rust/src/factors.rs): the unit of parallel work


@st.composite
def panel_streams(draw):
    """Widths over one to four panels with every kind of remainder (none, one
    column, one short, odd), float32 or bfloat16-bit rows."""
    n = draw(st.one_of(st.sampled_from([PANEL - 1, PANEL, PANEL + 1, 2 * PANEL + 1, 3 * PANEL - 1, 4 * PANEL]),
                       st.integers(PANEL + 2, 4 * PANEL)))
    bf16 = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    out = []
    for _ in range(draw(st.integers(1, 3))):
        t = draw(st.integers(1, 60))
        # a different magnitude per column: a value landing in the wrong column shows
        scale = 10.0 ** rng.uniform(-2, 2, size=(t, 1)) * 10.0 ** rng.uniform(-3, 3, size=(1, n))
        x = (rng.standard_normal((t, n)) * scale).astype(np.float32)
        out.append(to_bf16_bits(x) if bf16 else x)
    return n, out


@settings(max_examples=10, deadline=None)
@given(panel_streams())
def test_input_factor_matches_exact_sum_across_panels(stream):
    n, batches = stream
    f = lora_da.InputFactor(n)
    for b in batches:
        f.add(b)
    rows = [from_bf16_bits(b) if b.dtype == np.uint16 else b for b in batches]
    T = sum(b.shape[0] for b in rows)
    assert f.tokens == T
    exact = exact_gram(rows)
    got = f.mean() * T
    # entrywise against |X|ᵀ|X| (not only in norm): a wrong or missing entry
    # in one panel cannot hide behind the large entries of another
    x = np.abs(np.concatenate(rows).astype(np.float64))
    assert np.all(np.abs(got - exact) <= 1e-13 * (x.T @ x))
    np.testing.assert_array_equal(got, got.T)


def test_long_stream_does_not_lose_digits():
    """1.2 million tokens through many batches: the compensated sum stays exact
    to a few ulp."""
    rng = np.random.default_rng(0)
    n = 4
    f = lora_da.InputFactor(n)
    cols = [[] for _ in range(n * (n + 1) // 2)]
    for _ in range(300):
        x = (rng.standard_normal((4000, n)) + 3.0).astype(np.float32)
        f.add(x)
        x64 = x.astype(np.float64)
        k = 0
        for i in range(n):
            for j in range(i + 1):
                cols[k].append(math.fsum(x64[:, i] * x64[:, j]))
                k += 1
    exact = np.zeros((n, n))
    k = 0
    for i in range(n):
        for j in range(i + 1):
            exact[i, j] = exact[j, i] = math.fsum(cols[k])
            k += 1
    got = f.mean() * f.tokens
    assert f.tokens == 1_200_000
    assert rel_err(got, exact) <= 4e-15  # the mean·T round trip costs ~2 ulp


def test_float64_and_bfloat16_inputs():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((500, 9))
    f = lora_da.InputFactor(9)
    f.add(x)
    assert rel_err(f.mean() * 500, exact_gram([x])) <= 1e-12
    bits = to_bf16_bits(x)
    g = lora_da.InputFactor(9)
    g.add(bits)
    decoded = from_bf16_bits(bits)
    assert rel_err(g.mean() * 500, exact_gram([decoded])) <= 1e-14


def test_strided_input_equals_contiguous():
    rng = np.random.default_rng(2)
    big = rng.standard_normal((300, 40)).astype(np.float32)
    view = big[::3, 5:37:2]
    a, b = lora_da.InputFactor(16), lora_da.InputFactor(16)
    a.add(view)
    b.add(np.ascontiguousarray(view))
    assert a == b
    np.testing.assert_array_equal(a.packed(), b.packed())


def test_chunking_is_invisible_beyond_token_chunk():
    rng = np.random.default_rng(3)
    T = lora_da._core.TOKEN_CHUNK * 2 + 17
    x = rng.standard_normal((T, 6)).astype(np.float32)
    f = lora_da.InputFactor(6)
    f.add(x)
    assert rel_err(f.mean() * T, exact_gram([x])) <= 1e-13


def test_merge_is_associative_and_equals_one_stream():
    rng = np.random.default_rng(4)
    parts = [rng.standard_normal((200, 12)).astype(np.float32) * s for s in (1e-3, 1.0, 1e3)]

    def fac(*xs):
        f = lora_da.InputFactor(12)
        for x in xs:
            f.add(x)
        return f

    a, b, c = (fac(p) for p in parts)
    left = a.copy()
    left.merge(b)
    left.merge(c)
    bc = b.copy()
    bc.merge(c)
    right = a.copy()
    right.merge(bc)
    one = fac(*parts)
    exact = exact_gram(parts)
    for f in (left, right, one):
        assert f.tokens == 600
        assert rel_err(f.mean() * 600, exact) <= 1e-15
    assert rel_err(left.mean(), right.mean()) <= 1e-15


def test_add_gram_and_packed_round_trip():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((100, 7)).astype(np.float32)
    a = lora_da.InputFactor(7)
    a.add(x)
    b = lora_da.InputFactor(7)
    b.add_gram(x.astype(np.float64).T @ x.astype(np.float64), 100)
    assert b.tokens == 100
    assert rel_err(a.mean(), b.mean()) <= 1e-15
    c = lora_da.InputFactor.from_packed(7, a.packed(), a.tokens)
    np.testing.assert_array_equal(c.mean(), a.mean())
    s, comp = a.packed_raw()
    exact = lora_da.InputFactor.from_packed(7, s, a.tokens, comp)
    assert exact == a  # bit for bit, compensation included


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 150), t=st.integers(1, 60), seed=st.integers(0, 2**32 - 1))
def test_mean_into_writes_the_mean_bit_for_bit(n, t, seed):
    """mean_into (the device route's way to a page-locked buffer) gives mean()'s bits, and both are
    the exact sum of x xᵀ scaled by 1/T within the core's bound: float32 rows give exact products
    in float64, and a chunk's GEMM sums t of them, an error of at most (t − 1)·u·Σ|x_i x_j|
    (module docs of factors.rs), then one division."""
    x = np.random.default_rng(seed).standard_normal((t, n)).astype(np.float32)
    f = lora_da.InputFactor(n)
    f.add(x)
    out = np.full((n, n), np.nan)
    f.mean_into(out)
    z = f.mean()
    assert z.flags.c_contiguous and np.array_equal(out.view(np.int64), z.view(np.int64))
    x64 = x.astype(np.float64)  # the products of float32 numbers are exact in float64: fsum is the exact sum
    exact = np.array([[math.fsum(x64[:, i] * x64[:, j]) for j in range(n)] for i in range(n)]) / t
    bound = (t + 2) * 2.0**-53 * (np.abs(x64).T @ np.abs(x64)) / t
    assert np.all(np.abs(z - exact) <= bound)
    fortran = np.empty((n, n), order="F")  # the same buffer read transposed: Z is symmetric
    f.mean_into(fortran)
    np.testing.assert_array_equal(fortran, z)


def test_mean_into_refuses_a_wrong_buffer_and_leaves_it():
    f = lora_da.InputFactor(6)
    f.add(np.ones((3, 6)))
    read_only = np.zeros((6, 6))
    read_only.flags.writeable = False
    cases = [(np.zeros((6, 5)), "36|30|6 × 6"), (np.zeros((6, 6), np.float32), "float64"),
             (np.zeros((6, 12))[:, ::2], "contiguous"), (read_only, "writeable"), (np.zeros(36), "2 dimensions")]
    for out, words in cases:
        before = out.copy()
        with pytest.raises(lora_da.ShapeError, match=f"InputFactor.mean_into: .*({words})"):
            f.mean_into(out)
        np.testing.assert_array_equal(out, before)
    with pytest.raises(lora_da.InvalidArgumentError, match="no token"):
        lora_da.InputFactor(2).mean_into(np.zeros((2, 2)))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 140), t=st.integers(1, 10**6), seed=st.integers(0, 2**32 - 1), compensated=st.booleans())
def test_packed_mean_into_gives_the_factors_bits_without_the_factor(n, t, seed, compensated):
    """``InputFactor.packed_mean_into`` (compute_init's way from a statistics file's packed
    triangle to a GPU) writes the bits of ``from_packed(...).mean_into``, with and without a
    compensation, for n across the 64-wide tiles of the transpose; the triangle is unchanged."""
    rng = np.random.default_rng(seed)
    k = n * (n + 1) // 2
    packed = rng.standard_normal(k) * 10.0 ** rng.integers(-5, 6, k)
    comp = packed * 2.0**-60 * rng.standard_normal(k) if compensated else None
    keep = packed.copy()
    want = np.empty((n, n))
    lora_da.InputFactor.from_packed(n, packed, t, comp).mean_into(want)
    got = np.full((n, n), np.nan)
    lora_da.InputFactor.packed_mean_into(n, packed, t, got, comp)
    assert np.array_equal(got.view(np.int64), want.view(np.int64))
    assert np.array_equal(packed, keep)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 140), block=st.integers(1, 64), t=st.integers(1, 10**6), seed=st.integers(0, 2**32 - 1))
def test_a_packed_triangle_unpacked_by_torch_gives_the_cores_bits(n, block, t, seed):
    """``lora_da.packed``: the triangle packed from the device's row blocks is the file's order
    (the core's ``from_packed`` builds the same factor as ``add_gram`` on the whole matrix), and
    unpacked with torch (compute_init's way from a streamed file onto a GPU) it gives the bits
    of the core's ``packed_mean_into``, negative zeros included, for any ``GRAM_BLOCK``."""
    import torch

    from lora_da import plan
    from lora_da.packed import packed_columns, symmetric_mean_from_packed

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n + 3, n)) * 10.0 ** rng.integers(-3, 4, n)
    x[:, rng.integers(0, n)] = -0.0  # a column of zeros: its products' sums are signed zeros
    gram = x.T @ x
    old = plan.GRAM_BLOCK
    plan.GRAM_BLOCK = block
    try:
        rows = [torch.from_numpy(gram[a:b, :b].copy()) for a, b in plan.gram_block_rows(n)]
        parts = list(packed_columns(rows, n))
        packed = torch.cat([p for _, p in parts])
        assert [s for s, _ in parts] == list(np.cumsum([0] + [p.numel() for _, p in parts])[:-1])
        assert np.array_equal(packed.numpy(), gram.T[np.triu_indices(n)])  # column-major lower = row-major upper
        got = symmetric_mean_from_packed(packed, n, t).numpy()
    finally:
        plan.GRAM_BLOCK = old
    want = np.empty((n, n))
    lora_da.InputFactor.packed_mean_into(n, packed.numpy(), t, want, None)
    assert np.array_equal(got.view(np.int64), want.view(np.int64))


def test_packed_mean_into_refuses_bad_input_by_name_and_leaves_the_buffer():
    packed = np.arange(1.0, 11.0)  # n = 4
    cases = [(dict(n=5), lora_da.ShapeError, "packed triangle for n = 5"),
             (dict(tokens=0), lora_da.InvalidArgumentError, "no token"),
             (dict(tokens=True), lora_da.InvalidArgumentError, "tokens must be an integer, got the bool"),
             (dict(out=np.zeros((4, 3))), lora_da.ShapeError, "output holds 12 entries"),
             (dict(out=np.zeros((4, 8))[:, ::2]), lora_da.ShapeError, "out must be contiguous"),
             (dict(packed=packed.astype(np.float32)), lora_da.ShapeError, "packed must be a float64"),
             (dict(packed=np.where(packed == 3.0, np.inf, packed)), lora_da.NonFiniteError, "non-finite"),
             (dict(compensation=np.zeros(9)), lora_da.ShapeError, "compensation Some\\(9\\)")]
    for change, error, words in cases:
        kw = {**dict(n=4, packed=packed, tokens=3, out=np.full((4, 4), -1.0), compensation=None), **change}
        before = kw["out"].copy()
        with pytest.raises(error, match=words):
            lora_da.InputFactor.packed_mean_into(**kw)
        np.testing.assert_array_equal(kw["out"], before)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 70), cuts=st.lists(st.integers(1, 69), max_size=5), flushes=st.integers(1, 3),
       seed=st.integers(0, 2**32 - 1))
def test_gram_rows_add_what_the_whole_gram_adds_bit_for_bit(n, cuts, flushes, seed):
    """A flush's ``add_gram_rows`` over row blocks (rows a..b, columns 0..b, as the device
    keeps the Gram's lower block triangle) leaves the sums and compensations of ``add_gram``
    on the whole matrix, flush after flush; the tokens are counted once per flush."""
    rng = np.random.default_rng(seed)
    edges = sorted({0, n, *(c for c in cuts if c < n)})
    whole, rows = lora_da.InputFactor(n), lora_da.InputFactor(n)
    for _ in range(flushes):
        x = rng.standard_normal((5, n)) * 10.0 ** rng.integers(-8, 9)
        g = x.T @ x
        whole.add_gram(g, 5)
        first = True
        for a, b in zip(edges, edges[1:]):
            block = np.ascontiguousarray(g[a:b, :b])
            rows.add_gram_rows(a, block, 5 if first else 0)
            first = False
    (s1, c1), (s2, c2) = whole.packed_raw(), rows.packed_raw()
    assert np.array_equal(s1, s2) and np.array_equal(c1, c2) and whole.tokens == rows.tokens == 5 * flushes


def test_gram_rows_refuse_what_lies_outside_or_is_not_finite_and_change_nothing():
    f = lora_da.InputFactor(4)
    f.add(np.ones((2, 4)))
    before = f.copy()
    cases = [(3, np.ones((2, 4)), lora_da.ShapeError, "rows 3..5 of width 4"),
             (1, np.ones((2, 2)), lora_da.ShapeError, "rows 1..3 of width 2"),
             (0, np.ones((1, 5)), lora_da.ShapeError, "width 5"),
             (1, np.array([[1.0, np.nan, 0.0, 0.0]]), lora_da.NonFiniteError, r"non-finite value NaN at \(1, 1\)"),
             (0, np.ones((2, 4), np.float32), lora_da.ShapeError, "float64"),
             (0, np.ones((4, 2)).T, lora_da.ShapeError, "C-contiguous")]
    for first, rows, error, words in cases:
        with pytest.raises(error, match=words):
            f.add_gram_rows(first, rows, 3)
        assert f == before
    f.add_gram_rows(1, np.array([[1.0, 2.0, np.nan, np.nan]]), 0)  # entries above the diagonal are not read
    assert f != before and f.tokens == before.tokens


def test_bad_input_leaves_the_accumulator_unchanged():
    rng = np.random.default_rng(6)
    f = lora_da.InputFactor(5)
    f.add(rng.standard_normal((10, 5)).astype(np.float32))
    before = f.packed().copy()
    bad = rng.standard_normal((3000, 5)).astype(np.float32)
    bad[2900, 3] = np.inf  # after the first token chunk
    with pytest.raises(lora_da.NonFiniteError, match="row 2900, column 3"):
        f.add(bad)
    with pytest.raises(lora_da.ShapeError, match="n = 5"):
        f.add(np.zeros((3, 4), np.float32))
    with pytest.raises(lora_da.ShapeError, match="float32"):
        f.add(np.zeros((3, 5), np.int32))
    with pytest.raises(lora_da.ShapeError):
        f.add(np.zeros(5, np.float32))
    with pytest.raises(lora_da.ShapeError):
        f.add_gram(np.zeros((4, 4)), 3)
    with pytest.raises(lora_da.InvalidArgumentError):
        lora_da.InputFactor(0)
    assert f.tokens == 10
    np.testing.assert_array_equal(f.packed(), before)


_THREAD_SCRIPT = r"""
import sys, hashlib, numpy as np, lora_da
rng = np.random.default_rng(7)
f = lora_da.InputFactor(300)
for _ in range(3):
    f.add(rng.standard_normal((700, 300)).astype(np.float32))
o = lora_da.OutputFactor(300)
o.add(rng.standard_normal((900, 300)).astype(np.float32))
print(lora_da.num_threads(), hashlib.sha256(f.packed().tobytes() + o.sum().tobytes()).hexdigest())
"""


def test_bit_identical_across_thread_counts():
    digests = {}
    for threads in ("1", "2", "3"):
        env = dict(os.environ, RAYON_NUM_THREADS=threads)
        out = subprocess.run([sys.executable, "-c", _THREAD_SCRIPT], env=env, capture_output=True, text=True, check=True)
        used, digest = out.stdout.split()
        assert used == threads
        digests[threads] = digest
    assert len(set(digests.values())) == 1, digests


def test_concurrent_adds_from_python_threads():
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(8)
    parts = [rng.standard_normal((150, 20)).astype(np.float32) for _ in range(16)]
    f = lora_da.InputFactor(20)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(f.add, parts))
    assert f.tokens == 16 * 150
    assert rel_err(f.mean() * f.tokens, exact_gram(parts)) <= 1e-14


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.lists(st.integers(0, 30), min_size=1, max_size=6), st.integers(0, 2**31 - 1))
def test_output_factor_matches_exact_sum(m, lengths, seed):
    rng = np.random.default_rng(seed)
    T = sum(lengths)
    g = (rng.standard_normal((T, m)) * 10.0 ** rng.uniform(-8, 2, size=(1, m))).astype(np.float32)
    o = lora_da.OutputFactor(m, per_sample=True)
    o.add(g, sample_lengths=lengths)
    assert o.tokens == T and o.samples == len(lengths)
    g64 = g.astype(np.float64)
    exact = np.array([math.fsum(g64[:, j] ** 2) for j in range(m)])
    np.testing.assert_allclose(o.sum(), exact, rtol=1e-15, atol=0)
    bounds = np.cumsum([0] + lengths)
    u = np.stack([g64[a:b].sum(0) for a, b in zip(bounds[:-1], bounds[1:])])
    np.testing.assert_allclose(o.sample_sums(), u, rtol=1e-12, atol=1e-300)
    if T:
        np.testing.assert_allclose(o.mean(), exact / T, rtol=1e-15)


def test_output_factor_errors_and_merge():
    o = lora_da.OutputFactor(4, per_sample=True)
    with pytest.raises(lora_da.InvalidArgumentError, match="sample_lengths"):
        o.add(np.ones((3, 4), np.float32))
    with pytest.raises(lora_da.ShapeError, match="sum to 2"):
        o.add(np.ones((3, 4), np.float32), sample_lengths=[1, 1])
    bad = np.ones((3, 4), np.float32)
    bad[1, 2] = np.nan
    with pytest.raises(lora_da.NonFiniteError):
        o.add(bad, sample_lengths=[3])
    assert o.tokens == 0 and o.samples == 0
    a = lora_da.OutputFactor(4)
    a.add(np.ones((2, 4), np.float32))
    b = lora_da.OutputFactor(4)
    b.add(np.full((3, 4), 2.0, np.float32))
    a.merge(b)
    np.testing.assert_array_equal(a.sum(), np.full(4, 14.0))
    with pytest.raises(lora_da.ShapeError):
        a.merge(lora_da.OutputFactor(4, per_sample=True))


def test_a_new_factor_leaves_its_zero_pages_untouched():
    """A new InputFactor's zeros come from the allocator (untouched pages), not
    from writing them: writing put a 7B model's 44 GB of host factors in
    resident memory before the first batch. 2 × 1.6 GB here must not be resident."""
    assert child_rss_growth("", "f = lora_da.InputFactor(20000)") < 0.1e9


def child_rss_growth(setup: str, measured: str) -> int:
    """Bytes by which ``measured`` grows a fresh process's resident set after ``setup``. The
    resident set of that process alone, before and after: ru_maxrss would carry the parent's
    high-water mark into a child started by vfork + exec (it read pytest's 1.4 GB in CI),
    /proc/self/status's VmRSS does not."""
    import subprocess
    import sys

    code = ("import lora_da\n"
            "def rss():\n"
            "    for line in open('/proc/self/status'):\n"
            "        if line.startswith('VmRSS:'): return int(line.split()[1]) * 1024\n"
            f"{setup}\nbefore = rss()\n{measured}\nprint(rss() - before)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1])


def test_touch_faults_in_the_pages_and_changes_no_sum():
    """``touch`` puts a new factor's pages in resident memory (so that a flush does
    not pay their first touch) and leaves what a used factor holds bit for bit."""
    assert child_rss_growth("f = lora_da.InputFactor(10000)", "f.touch()") > 0.7e9  # 2 × 10000·10001/2 float64 = 0.8 GB

    rng = np.random.default_rng(3)
    f = lora_da.InputFactor(37)
    f.add(rng.standard_normal((50, 37)) * 1e3)
    f.add(rng.standard_normal((20, 37)).astype(np.float32))
    before, tokens = f.packed_raw(), f.tokens
    f.touch()
    after = f.packed_raw()
    assert f.tokens == tokens
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
