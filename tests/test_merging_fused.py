"""The fused merge kernels (hf_cft.merging.fused, numba) against the torch kernels they replace: the same merges
through the registry with ``HF_CFT_FUSED=0`` and ``1``. On tensors of small integers every sum is exact, so the two
must agree bit for bit whatever order torch sums in; on Gaussian tensors they agree to fp32 rounding (torch may sum
the T terms of an entry in another order than list order)."""

from __future__ import annotations

import pytest
import torch

from hf_cft.merging import fused
from hf_cft.merging.streaming import merge_deltas

pytestmark = pytest.mark.skipif(
    not fused.available(), reason="numba is not installed (optional: pip install 'hf-cft[fast]')"
)


@pytest.fixture(params=["one core", "every core"])
def kernel_form(request, monkeypatch):
    """Each kernel is compiled twice (one core for small inputs, every core above fused.PARALLEL_MIN): both run."""
    monkeypatch.setattr(fused, "PARALLEL_MIN", 0 if request.param == "every core" else 1 << 62)
    monkeypatch.setattr(fused, "SELECT_PARALLEL_MIN", 0 if request.param == "every core" else 1 << 62)
    monkeypatch.setattr(fused, "DELLA_PARALLEL_MIN", 0 if request.param == "every core" else 1 << 62)
    return request.param


CASES = [
    ("ties", {"density": 0.3}),
    ("ties", {"density": 0.2, "weight": 0.7}),
    ("breadcrumbs", {"density": 0.3, "gamma": 0.05}),
    ("consensus", {"k": 2}),
    ("consensus", {"k": 1, "weight": -0.5, "tall_lambda": 0.6}),
    ("magmax", {}),
    ("magmax", {"tie_break": "earlier", "weight": 0.3}),
    ("model_stock", {}),
    ("della", {"density": 0.3}),
    ("dare", {"density": 0.3}),
    ("dare", {"density": 0.6, "weight": 0.7, "then": "ties"}),
    ("della", {"density": 0.4, "epsilon": 0.2, "rng": "counter", "rank_scope": "tensor", "weight": 0.7}),
]
SHAPES = {"w": (96, 130), "b": (130,), "one": (1,)}


def _deltas(t, kind, seed=0):
    g = torch.Generator().manual_seed(seed)

    def draw(shape):
        if kind == "ints":  # many equal magnitudes, zeros and exact sums
            return torch.randint(-4, 5, shape, generator=g).float()
        return torch.randn(shape, generator=g)

    return [{k: draw(s) for k, s in SHAPES.items()} for _ in range(t)]


def _both(monkeypatch, deltas, method, options):
    monkeypatch.setenv("HF_CFT_FUSED", "0")
    reference = merge_deltas(deltas, method, options)
    monkeypatch.setenv("HF_CFT_FUSED", "1")
    return reference, merge_deltas(deltas, method, options)


@pytest.mark.parametrize("method,options", CASES)
@pytest.mark.parametrize("t", [2, 3])
def test_fused_kernels_equal_the_torch_kernels_bit_for_bit_on_exact_sums(monkeypatch, kernel_form, method, options, t):
    deltas = _deltas(t, "ints", seed=t)
    reference, got = _both(monkeypatch, deltas, method, options)
    assert reference.keys() == got.keys()
    for key in reference:
        assert torch.equal(reference[key], got[key]), (method, options, key)
        if method != "model_stock":  # the Gram's sums are fp64 in one, fp32 blocks in the other: the ratio may round
            assert torch.equal(reference[key].abs().view(torch.int32), got[key].abs().view(torch.int32)), key


@pytest.mark.parametrize("method,options", CASES)
@pytest.mark.parametrize("t", [3, 8])
def test_fused_kernels_equal_the_torch_kernels_to_rounding_on_gaussian_deltas(monkeypatch, method, options, t):
    deltas = _deltas(t, "randn", seed=11)
    reference, got = _both(monkeypatch, deltas, method, options)
    for key in reference:
        torch.testing.assert_close(got[key], reference[key], rtol=1e-6, atol=1e-6)


def test_fused_kernels_are_used_and_can_be_switched_off(monkeypatch):
    """With numba the merges take the fused path (a planted failure in it surfaces); HF_CFT_FUSED=0 and tensors the
    kernels do not take (fp64, non-contiguous) go to the torch kernels."""
    deltas = _deltas(2, "ints")

    def broken(*args, **kwargs):
        raise RuntimeError("fused path taken")

    monkeypatch.setattr(fused, "ties_mean", broken)
    with pytest.raises(RuntimeError, match="fused path taken"):
        merge_deltas(deltas, "ties", {"density": 0.3})
    monkeypatch.setenv("HF_CFT_FUSED", "0")
    assert not fused.available()
    merge_deltas(deltas, "ties", {"density": 0.3})
    monkeypatch.setenv("HF_CFT_FUSED", "1")
    assert not fused.applies(torch.zeros(4, dtype=torch.float64))
    assert not fused.applies(torch.zeros(4, 4).t())


@pytest.mark.parametrize("kind", ["ints", "randn"])
def test_radix_selection_equals_the_introselect_thresholds_and_ties(monkeypatch, kernel_form, kind):
    """The radix selection (taken for every size here) gives TIES' threshold and tied drops and breadcrumbs' band
    limits and ties exactly as numpy's introselect does, on tie-heavy and Gaussian tensors, every rank edge case."""
    import numpy as np

    from hf_cft.merging.baselines import _trim_threshold
    from hf_cft.merging.methods import _band_limits

    x = _deltas(1, kind, seed=5)[0]["w"].reshape(-1)
    x[:40] = -0.0
    n = x.numel()

    def both(fn):
        monkeypatch.setattr(fused, "SELECT_MIN", n + 1)
        want = fn()
        monkeypatch.setattr(fused, "SELECT_MIN", 0)
        return want, fn()

    for keep in (1, 2, n // 3, n // 2, n - 50, n - 1):
        (t1, d1), (t2, d2) = both(lambda keep=keep: _trim_threshold(x, keep))
        assert t1 == t2 and ((d1 is None and d2 is None) or torch.equal(d1, d2)), keep
    for start, stop in ((0, 5), (3, n // 4), (n // 5, n // 2), (n // 3, n), (0, n), (n - 60, n - 1)):
        want, got = both(lambda start=start, stop=stop: _band_limits(x.numpy(), start, stop))
        assert want[:2] == got[:2], (start, stop)
        assert len(want[2]) == len(got[2])
        for (e1, k1), (e2, k2) in zip(want[2], got[2]):
            assert np.array_equal(e1, e2) and np.array_equal(k1, k2)


def test_fused_merges_from_several_threads_at_once_agree_with_one_thread():
    """numba's workqueue pool aborts the process when two threads enter it together: hf_cft serialises the kernel
    calls, so merges run from a thread pool finish and give the single-thread results; DARE's and DELLA's draws (the
    one-core MT19937, called without the lock) each from their own stream."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = [(_deltas(3, "randn", seed=s), method, dict(options)) for s in range(4) for method, options in CASES]
    alone = [merge_deltas(d, m, o) for d, m, o in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        together = list(pool.map(lambda job: merge_deltas(*job), jobs))
    for a, b in zip(alone, together):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_compile_loads_every_kernel_on_numbas_own_thread_pool(monkeypatch):
    """``_compile`` (cached once per process, so called here unwrapped): every kernel the merges use, by name, and
    numba's default (or OpenMP) threading layer replaced by its workqueue pool (OpenMP changed torch's later results);
    a layer the user chose otherwise is kept."""
    numba = pytest.importorskip("numba")
    from hf_cft.merging import _fused_kernels

    names = ("ties_mean_flagged", "band_sum_flagged", "consensus", "magmax", "gram_sum", "scale_in_place",
             "magnitude_histogram", "dare_ta", "della_elect", "mt19937_low24", "mt19937_seed", "dare_add")
    for layer, want in (("default", "workqueue"), ("omp", "workqueue"), ("tbb", "tbb"), ("workqueue", "workqueue")):
        monkeypatch.setattr(numba.config, "THREADING_LAYER", layer)
        got = fused._compile()
        chosen = numba.config.THREADING_LAYER
        assert chosen == want, layer
        assert set(got) == {*names, "bucket_entries", "numba", "np"}
        assert all(got[name] is getattr(_fused_kernels, name) for name in (*names, "bucket_entries"))
        assert got["numba"] is numba and got["np"].__name__ == "numpy"


def test_band_sum_decides_the_positions_tied_in_another_input_by_this_inputs_own_band(monkeypatch):
    """Breadcrumbs with one input all ties (every position is then resolved apart, by position) and one of distinct
    magnitudes: at those positions the second input keeps exactly lo ≤ |x| < hi, its own band edges included / excluded
    as the sorted-rank definition says."""
    pytest.importorskip("numba")
    from hf_cft.merging.methods import breadcrumbs_key

    ties = torch.ones(20)
    distinct = torch.randperm(20, generator=torch.Generator().manual_seed(0)).float() + 1  # magnitudes 1..20
    distinct[::3] *= -1
    want = None
    for on in ("0", "1"):
        monkeypatch.setenv("HF_CFT_FUSED", on)
        got = breadcrumbs_key([ties, distinct], [1.0, 2.0], [0.5, 0.5], 0.1)  # drop the top 2, keep the next 10
        want = got if want is None else want
        assert torch.equal(got, want), on
    mags = distinct.abs()
    kept_b = (mags >= 9) & (mags < 19)  # ranks 2..11 of 20, largest first: magnitudes 18 down to 9
    kept_a = torch.zeros(20, dtype=torch.bool)
    kept_a[2:12] = True  # all tied: by position
    torch.testing.assert_close(want, ties * kept_a + 2.0 * distinct * kept_b)


def test_fused_ties_mean_with_every_weight_two_scales_every_input():
    """Weights of 2.0 for every input (no input at 1.0) still scale: the fused TIES mean equals the whole-tensor
    formula on 2·τ_t."""
    from hf_cft.merging.baselines import _elect_disjoint, _tensor_threshold

    g = torch.Generator().manual_seed(2)
    flats = [torch.randint(-8, 9, (5000,), generator=g).float() / 4 for _ in range(3)]
    thresholds = [_tensor_threshold(f, 0.5) for f in flats]
    got = fused.ties_mean(flats, [t[0] for t in thresholds], [t[1] for t in thresholds], [2.0, 2.0, 2.0])
    trimmed = []
    for f, (thr, drops) in zip(flats, thresholds):
        keep = f.abs() >= thr
        if drops is not None:
            keep[drops] = False
        trimmed.append(2.0 * f * keep)
    torch.testing.assert_close(got, _elect_disjoint(torch.stack(trimmed), "mean"), rtol=0, atol=0)


def test_a_large_fp64_tensor_is_trimmed_like_its_fp32_copy():
    """Above fused.SELECT_MIN entries an fp32 tensor takes the radix selection, an fp64 one numpy's (the kernel reads
    fp32 bits only): both keep the same entries of dyadic values."""
    from hf_cft.merging.baselines import trim_top_k

    g = torch.Generator().manual_seed(5)
    x = torch.randint(-64, 65, (fused.SELECT_MIN + 17,), generator=g).float() / 8
    torch.testing.assert_close(trim_top_k(x.double(), 0.3).float(), trim_top_k(x, 0.3), rtol=0, atol=0)


def test_fused_ties_mean_rounds_the_thresholds_to_fp32_as_the_torch_kernel_does():
    """The torch kernel compares |τ| with its thresholds as fp32 (``torch.tensor(..., dtype=float32)``), so the
    fused one does too: at a threshold of 0.7 (fp32: 0.69999999) an entry equal to fp32(0.7) is kept."""
    x = torch.tensor([0.7, -0.7, 0.5, -0.25])
    limit = torch.tensor(0.7, dtype=torch.float32)
    assert torch.equal(x.abs() >= limit, torch.tensor([True, True, False, False]))
    got = fused.ties_mean([x], [0.7], [None], [1.0])
    assert torch.equal(got, torch.tensor([0.7, -0.7, 0.0, 0.0]))


@pytest.mark.parametrize("kind", ["ints", "randn"])
def test_radix_selection_is_exact_with_one_histogram_per_thread_of_a_four_core_machine(monkeypatch, kind):
    """kth_largest_magnitudes splits the entries into one chunk per numba thread (here four, as on a four-core
    machine) and collects each chunk's entries of the selected bucket from its own offset on: every rank's value and
    its counts of greater and equal magnitudes are those of a full sort."""
    import numba
    import numpy as np

    monkeypatch.setattr(numba, "get_num_threads", lambda: 4)
    monkeypatch.setattr(fused, "SELECT_PARALLEL_MIN", 0)  # small as it is, selected in chunks
    x = _deltas(1, kind, seed=9)[0]["w"].reshape(-1).numpy()
    mags = np.sort(np.abs(x))[::-1]
    n = x.size
    ranks = [1, 2, 7, n // 5, n // 3, n // 2, n - 3, n]
    got = fused.kth_largest_magnitudes(x, ranks)
    for r, (value, greater, equal) in zip(ranks, got):
        v = mags[r - 1]
        assert (value, greater, equal) == (float(v), int((mags > v).sum()), int((mags == v).sum())), r


@pytest.mark.parametrize("chunks", [1, 3])
def test_selection_counts_the_nan_and_inf_entries_on_one_core_and_in_chunks(monkeypatch, chunks):
    """The radix selection counts the NaN/inf entries from the histogram's own buckets (no other pass), in one chunk
    and in several; the ranks among the finite entries are still exact."""
    import numba
    import numpy as np

    monkeypatch.setattr(numba, "get_num_threads", lambda: chunks)
    monkeypatch.setattr(fused, "SELECT_PARALLEL_MIN", 0 if chunks > 1 else 1 << 62)
    x = np.random.default_rng(3).standard_normal(50_000).astype(np.float32)
    found, nonfinite = fused._radix_select(np, x.view(np.uint32), [10, 25_000])
    assert nonfinite == 0
    mags = np.sort(np.abs(x))[::-1]
    assert [found[r][0] for r in (10, 25_000)] == [float(mags[9]), float(mags[24_999])]
    x[[5, 77, 40_000]] = [np.nan, np.inf, -np.inf]
    found, nonfinite = fused._radix_select(np, x.view(np.uint32), [10])
    assert nonfinite == 3
    finite = np.sort(np.abs(x[np.isfinite(x)]))[::-1]
    assert found[10] == (float(finite[6]), 9, 1)  # the three non-finite entries order above every finite one


@pytest.fixture
def trim_pass(monkeypatch):
    """Every key (however small) through fused.ties_trim_mean_ranges, the one-histogram-pass TIES of streaming merges."""
    monkeypatch.setattr(fused, "SELECT_MIN", 0)
    calls = []
    real = fused.ties_trim_mean_ranges
    monkeypatch.setattr(fused, "ties_trim_mean_ranges", lambda *a: calls.append(a[1]) or real(*a))
    return calls


@pytest.mark.parametrize("kind", ["ints", "randn"])
@pytest.mark.parametrize("t", [1, 2, 5])
@pytest.mark.parametrize("options", [{"density": 0.3}, {"density": 0.2, "weight": 0.7}, {"density": 0.05}])
def test_ties_in_one_histogram_pass_equals_the_exact_thresholds_bit_for_bit(
    monkeypatch, kernel_form, trim_pass, kind, t, options
):
    """The bucket-then-flagged-positions TIES gives the bits of the exact-threshold kernel (fused.ties_mean after
    _trim_threshold's value and tie drops) — on tie-heavy integers (whole buckets of equal magnitudes, ties at every
    threshold) and on Gaussians — and, on integers, of the torch kernels."""
    from hf_cft.merging.baselines import _tensor_threshold

    deltas = _deltas(t, kind, seed=20 + t)
    got = merge_deltas(deltas, "ties", options)
    assert trim_pass  # the pass ran
    weight = options.get("weight", 1.0)
    for key in got:
        flats = [d[key].reshape(-1) for d in deltas]
        limits = [_tensor_threshold(f, options["density"]) for f in flats]
        want = fused.ties_mean(flats, [lim[0] for lim in limits], [lim[1] for lim in limits], [weight] * t)
        assert torch.equal(got[key].reshape(-1).view(torch.int32), want.view(torch.int32)), key
    if kind == "ints":
        monkeypatch.setenv("HF_CFT_FUSED", "0")
        reference = merge_deltas(deltas, "ties", options)
        assert all(torch.equal(reference[k], got[k]) for k in got)


@pytest.mark.parametrize("method,options", [("ties", {"density": 0.3}), ("breadcrumbs", {}),
                                            ("breadcrumbs", {"density": 1e-5, "gamma": 0.0}), ("magmax", {}),
                                            ("magmax", {"tie_break": "earlier", "weight": 0.0}),
                                            ("della", {}), ("della", {"rng": "counter", "weight": 0.0})])
@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_one_histogram_pass_names_the_input_that_holds_nan(trim_pass, monkeypatch, method, options, bad):
    """The histograms (TIES, breadcrumbs) and MagMax's kernel count NaN/inf entries (the inputs are not read again to
    check them): a NaN or inf still raises NonFiniteError naming the input and the key (also for an input whose band
    keeps nothing, or weighted 0)."""
    from hf_cft.errors import NonFiniteError

    monkeypatch.setattr(fused, "SELECT_MIN", 0)
    deltas = _deltas(3, "randn", seed=4)
    deltas[1]["w"][7, 3] = bad
    with pytest.raises(NonFiniteError, match=r"^The delta of input 1 holds NaN/inf at key .w.\.$"):
        merge_deltas(deltas, method, options)


@pytest.mark.parametrize("kind", ["ints", "randn"])
@pytest.mark.parametrize("t", [1, 3])
@pytest.mark.parametrize(
    "options",
    [
        {"density": 0.3, "gamma": 0.05},
        {"density": 0.1, "gamma": 0.0},  # no upper edge
        {"density": 0.95, "gamma": 0.05},  # no lower edge
        {"density": 0.002, "gamma": 0.3},  # a narrow band: both edges in one bucket
        {"density": 0.2, "gamma": 0.01, "weight": -0.7},
    ],
)
def test_breadcrumbs_in_one_histogram_pass_equals_the_exact_band_bit_for_bit(monkeypatch, kernel_form, kind, t, options):
    """Breadcrumbs with both band edges first known to their buckets and the flagged positions summed again gives the
    bits of the exact edges (_band_limits, then fused.band_sum) — with ties at the edges (integers), no upper or no
    lower edge, and both edges in one bucket — and, on integers, of the torch kernels."""
    import numpy as np

    from hf_cft.merging.methods import _band_limits

    monkeypatch.setattr(fused, "SELECT_MIN", 0)
    calls = []
    real = fused.band_sum_trimmed
    monkeypatch.setattr(fused, "band_sum_trimmed", lambda *a: calls.append(1) or real(*a))
    deltas = _deltas(t, kind, seed=30 + t)
    got = merge_deltas(deltas, "breadcrumbs", options)
    assert calls
    weight = options.get("weight", 0.3)  # breadcrumbs' default weight (λ)
    for key in got:
        flats = [d[key].reshape(-1) for d in deltas]
        n = flats[0].numel()
        start = int(options["gamma"] * n)
        stop = min(n, start + int(options["density"] * n))
        bands = []
        for f in flats:
            if stop <= start:
                bands.append((np.inf, np.inf, []))
                continue
            lo, hi, ties = _band_limits(f.numpy(), start, stop)
            bands.append((lo, hi, [(torch.from_numpy(e), torch.from_numpy(k)) for e, k in ties]))
        want = fused.band_sum(flats, bands, [weight] * t)
        assert torch.equal(got[key].reshape(-1).view(torch.int32), want.view(torch.int32)), key
    if kind == "ints":
        monkeypatch.setenv("HF_CFT_FUSED", "0")
        reference = merge_deltas(deltas, "breadcrumbs", options)
        assert all(torch.equal(reference[k], got[k]) for k in got)


@pytest.mark.parametrize("kind", ["ints", "randn"])
@pytest.mark.parametrize("options", [{"density": 0.3}, {"density": 0.1, "weight": 0.6}])
def test_ties_in_chunks_equals_the_whole_tensors_bit_for_bit(monkeypatch, kind, options):
    """Keys of at least fused.CHUNK entries merge chunk by chunk (one chunk of each input in memory): the same bits
    as the whole-tensor pass, with chunks that split rows and a last short chunk."""
    monkeypatch.setattr(fused, "SELECT_MIN", 0)
    deltas = _deltas(3, kind, seed=41)
    whole = merge_deltas(deltas, "ties", options)
    spans = []
    real = fused.ties_trim_mean_ranges

    def spy(read, n, keeps, weights):
        return real(lambda t, a, b: spans.append(b - a) or read(t, a, b), n, keeps, weights)

    monkeypatch.setattr(fused, "ties_trim_mean_ranges", spy)
    monkeypatch.setattr(fused, "CHUNK", 1001)
    chunked = merge_deltas(deltas, "ties", options)
    assert spans and max(spans) == 1001 and min(spans) < 1001  # the 96×130 key in 13 chunks, the last one short
    for key in whole:
        assert torch.equal(whole[key].view(torch.int32), chunked[key].view(torch.int32)), key


def test_ties_in_chunks_reads_model_folders_by_range_and_names_a_nan(monkeypatch, tmp_path):
    """From model folders (fp32 and fp16 inputs, and a LoRA adapter, which computes its whole ΔW per range) the
    chunked TIES reads ranges of the safetensors files, no range longer than a chunk, and writes the same model as
    the whole-tensor pass; a NaN in an input file is named by input and key."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModel

    from hf_cft.errors import NonFiniteError
    from hf_cft.merging import streaming
    from hf_cft.testing import save_tiny_clip

    base_dir = save_tiny_clip(tmp_path / "clip", hidden_size=32, num_layers=1)
    inputs = []
    for seed, dtype in ((1, torch.float32), (2, torch.float16)):
        model = AutoModel.from_pretrained(base_dir)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name != "logit_scale":
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
        model.to(dtype).save_pretrained(tmp_path / f"ft{seed}")
        inputs.append(tmp_path / f"ft{seed}")
    torch.manual_seed(3)
    lora = LoraConfig(r=2, target_modules=["fc1", "q_proj"], init_lora_weights=False)
    get_peft_model(AutoModel.from_pretrained(base_dir), lora).save_pretrained(tmp_path / "lora")
    inputs.append(tmp_path / "lora")
    monkeypatch.setattr(fused, "SELECT_MIN", 0)
    streaming.merge_folders(base_dir, inputs, "ties", {"density": 0.2}, out=tmp_path / "whole")
    sizes = []
    real = streaming.SafetensorsFile.read_range
    monkeypatch.setattr(
        streaming.SafetensorsFile, "read_range", lambda self, k, a, b, *out: sizes.append(b - a) or real(self, k, a, b, *out)
    )
    monkeypatch.setattr(fused, "CHUNK", 777)
    streaming.merge_folders(base_dir, inputs, "ties", {"density": 0.2}, out=tmp_path / "chunked")
    assert sizes and max(sizes) <= 777
    whole, chunked = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "chunked" / "model.safetensors")
    assert whole.keys() == chunked.keys()
    assert all(torch.equal(whole[k], chunked[k]) for k in whole)
    bad = load_file(inputs[0] / "model.safetensors")
    key = "text_model.encoder.layers.0.mlp.fc1.weight"
    bad[key][3, 4] = float("nan")
    (tmp_path / "nan_ft").mkdir()
    for f in inputs[0].iterdir():
        if f.name != "model.safetensors":
            (tmp_path / "nan_ft" / f.name).write_bytes(f.read_bytes())
    from safetensors.torch import save_file

    save_file(bad, tmp_path / "nan_ft" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(NonFiniteError, match=rf"^The delta of input 1 \(.*nan_ft'?\) holds NaN/inf at key '{key}'.$"):
        streaming.merge_folders(base_dir, [inputs[1], tmp_path / "nan_ft"], "ties", {"density": 0.2}, out=tmp_path / "o")


@pytest.mark.parametrize(
    "method,options,inputs",
    [
        ("magmax", {}, [{"weight": 1e30}, {"weight": 1e30}]),
        ("ties", {"density": 0.5}, [{"weight": 1e30}, {"weight": 1e30}]),
        ("breadcrumbs", {"density": 0.5}, [{"weight": 1e30}, {"weight": 1e30}]),
        ("model_stock", {}, None),
        ("della", {"rng": "counter"}, [{"weight": 1e30}, {"weight": 1e30}]),
    ],
)
def test_kernels_that_count_their_results_still_refuse_an_overflow(monkeypatch, method, options, inputs):
    """The fused kernels count NaN/inf results, so the streaming merge does not read a finite result again; finite
    inputs whose weights (or sum) overflow still give MergeConfigError naming the method and key."""
    from hf_cft.errors import MergeConfigError

    monkeypatch.setattr(fused, "SELECT_MIN", 0)
    scale = 2e38 if method == "model_stock" else 1e10  # model stock: the sum of two 2e38 overflows; else the weights
    deltas = [{"w": scale * (1 + 1e-4 * torch.arange(2000.0).view(40, 50))} for _ in range(2)]
    assert all(torch.isfinite(d["w"]).all() for d in deltas)
    with pytest.raises(MergeConfigError, match=rf"^The merged delta of '{method}' at key 'w' holds NaN/inf"):
        merge_deltas(deltas, method, options, inputs=inputs)
    fine = merge_deltas([{"w": torch.randn(40, 50)} for _ in range(2)], method, options, inputs=None)
    assert torch.isfinite(fine["w"]).all()


@pytest.mark.parametrize("method", ["magmax", "ties", "breadcrumbs", "model_stock", "della"])
def test_a_counted_finite_merge_is_read_once(monkeypatch, method):
    """With the fused kernels counting NaN/inf in the inputs and results, a finite streaming merge makes no separate
    finite check at all (no extra pass over an input or the result)."""
    from hf_cft.merging import deltas as deltas_module

    monkeypatch.setattr(fused, "SELECT_MIN", 0)
    calls = []
    real = deltas_module.all_finite
    monkeypatch.setattr(deltas_module, "all_finite", lambda t: calls.append(t.shape) or real(t))
    merged = merge_deltas(_deltas(3, "randn", seed=8), method, {})
    assert calls == [] and all(torch.isfinite(v).all() for v in merged.values())


def _della_rows(kind: str, g: torch.Generator) -> torch.Tensor:
    """Rows that take each path of the fused DELLA ranking: spread magnitudes (bucket counts), a zero row and a row of
    equal magnitudes (one crowded bucket: sorted), an outlier with the rest clustered (crowded too), subnormals."""
    if kind == "ints":
        return torch.randint(-3, 4, (50, 33), generator=g).float()
    x = torch.randn(40, 100, generator=g)
    if kind == "mixed":
        x[5] = 0.0
        x[6] = -2.5
        x[7, :90] = 1e-3 * torch.randn(90, generator=g)
        x[7, 90] = 1e3
        x[8] *= 1e-41
    return x


@pytest.mark.parametrize("kind", ["randn", "ints", "mixed"])
@pytest.mark.parametrize("rng", ["torch", "counter"])
@pytest.mark.parametrize("rank_scope", ["row", "tensor"])
@pytest.mark.parametrize("t", [1, 3])
def test_fused_della_equals_the_reference_bit_for_bit(monkeypatch, kernel_form, kind, rng, rank_scope, t):
    """The fused DELLA (ranks from bucket counts, the draws in the kernel, the election fused) gives the reference
    MagPrune + election's result bit for bit, the sign of every zero included, with per-input weights and densities,
    both streams and rank scopes, on every path of the ranking; shapes with one entry per row and one entry."""
    from hf_cft.merging import methods

    g = torch.Generator().manual_seed(t)
    calls = []
    real = fused.della
    monkeypatch.setattr(fused, "della", lambda *a: calls.append(1) or real(*a))
    for shape in [None, (300, 1), (7,), (1,), (1, 5)]:
        tensors = [_della_rows(kind, g) if shape is None else torch.randn(shape, generator=g) for _ in range(t)]
        weights = [0.6 + 0.2 * i for i in range(t)]
        densities = [0.3 + 0.1 * i for i in range(t)]
        calls.clear()
        monkeypatch.setenv("HF_CFT_FUSED", "1")
        got = methods.della_key("k", tensors, weights, densities, 0.1, 5, rank_scope, rng)
        monkeypatch.setenv("HF_CFT_FUSED", "0")
        reference = methods.della_key("k", tensors, weights, densities, 0.1, 5, rank_scope, rng)
        assert calls == [1]
        assert torch.equal(got.view(torch.int32), reference.view(torch.int32)), (shape, kind)


def test_fused_della_ranks_a_row_of_many_buckets_on_every_core(monkeypatch):
    """Long rows (buckets shared by several entries: the insertion sort), many rows split among the threads, T = 8 with
    weights of 1: the same bits as the reference."""
    from hf_cft.merging import methods

    monkeypatch.setattr(fused, "DELLA_PARALLEL_MIN", 0)
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(301, 1030, generator=g) * 10 ** float(i - 4) for i in range(8)]
    monkeypatch.setenv("HF_CFT_FUSED", "1")
    got = methods.della_key("key", tensors, [1.0] * 8, [0.2] * 8, 0.05, 0, "row", "counter")
    monkeypatch.setenv("HF_CFT_FUSED", "0")
    reference = methods.della_key("key", tensors, [1.0] * 8, [0.2] * 8, 0.05, 0, "row", "counter")
    assert torch.equal(got.view(torch.int32), reference.view(torch.int32))


@pytest.mark.parametrize("rng", ["torch", "counter"])
def test_fused_dare_takes_each_inputs_draws_in_order(monkeypatch, kernel_form, rng):
    """DARE + task arithmetic fused (the CPU generator's draws by the fused MT19937, one pass per input; or the counter
    stream in one pass): bit for bit the blocked torch kernels with numpy's draws, with per-input densities and
    weights, an input kept whole (density 1: it takes no draws) between dropped ones."""
    g = torch.Generator().manual_seed(5)
    deltas = [{"w": torch.randn(70, 90, generator=g), "b": torch.randn(333, generator=g)} for _ in range(4)]
    inputs = [{"density": 0.3, "weight": 0.5}, {"density": 1.0, "weight": 1.0}, {"density": 0.6, "weight": 1.0},
              {"density": 0.1, "weight": -2.0}]
    calls = []
    real = fused.dare_ta
    monkeypatch.setattr(fused, "dare_ta", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("HF_CFT_FUSED", "1")
    got = merge_deltas(deltas, "dare", {"rng": rng, "seed": 4}, inputs=[dict(i) for i in inputs])
    monkeypatch.setenv("HF_CFT_FUSED", "0")
    reference = merge_deltas(deltas, "dare", {"rng": rng, "seed": 4}, inputs=[dict(i) for i in inputs])
    assert len(calls) == 2
    for key in reference:
        assert torch.equal(got[key].view(torch.int32), reference[key].view(torch.int32)), key


@pytest.mark.parametrize("t", [1, 2, 3])
def test_gram_sum_gives_the_exact_gram_and_the_list_order_sum(kernel_form, t):
    """Model stock's one pass (two inputs in one loop, more by blocks of dots): the Gram matrix is the fp64 sum of the
    exact products (to fp64 rounding, in any order), symmetric, and the sum is Σ_t x_t in list order, bit for bit; a
    length that is not a multiple of the block."""
    from hf_cft.merging._fused_kernels import GRAM_BLOCK

    g = torch.Generator().manual_seed(t)
    flats = [torch.randn(3 * GRAM_BLOCK + 77, generator=g) * 10.0 ** (i - 1) for i in range(t)]
    gram, total = fused.gram_sum(flats)
    want = torch.stack([f.double() for f in flats])
    torch.testing.assert_close(gram, want @ want.T, rtol=1e-12, atol=0.0)
    assert torch.equal(gram, gram.T)
    expected = flats[0].clone()
    for f in flats[1:]:
        expected = expected + f
    assert torch.equal(total, expected)
