"""The GPU path's choices and its 8-bit products (issue 15), on the CPU: the tuner's rules with a stand-in
timer, each projection implementation against the float32 product, the quantization kernels against their
torch twins, the float8 precision, and the warm-up's coverage of Triton's specializations. Kernels run in
Triton's interpreter, as in test_kernels.py."""

from __future__ import annotations

import json

import pytest
import torch

# Triton and the kernels were imported by conftest.py with TRITON_INTERPRET set (without CUDA).
pytest.importorskip("triton", reason="triton is not installed (pip install '.[dev]' brings it for these tests)")
from fastinstructor.kernels import matmul, tuning  # noqa: E402
from fastinstructor.kernels.projection import CUBLAS, SMALL_TOKENS, Projection, shape_class  # noqa: E402
from fastinstructor.kernels.quantize import quantize_rows, quantize_rows_ref  # noqa: E402
from fastinstructor.kernels.rms_norm import rms_norm_quantized, rms_norm_quantized_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
QUANT = [torch.int8, torch.float8_e4m3fn]


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


class Timer:
    """A stand-in for the GPU's timings: ms per candidate (by its position), a failure where given."""

    def __init__(self, times: dict[int, float], fail: tuple[int, ...] = ()) -> None:
        self.times, self.fail, self.calls = times, fail, []

    def __call__(self, site, klass, candidate) -> float:
        index = site.candidates(klass).index(candidate)
        self.calls.append((site.key(klass), index))
        if index in self.fail:
            raise RuntimeError("out of resource: shared memory")
        return self.times.get(index, 10.0)


def never(site, klass, candidate):
    raise AssertionError(f"measured {site.key(klass)} although the table holds it")


BF16_QKV = tuning.Site("linear", "bfloat16", "bfloat16", False, 2304, 768)
INT8_WI = tuning.Site("linear_int8", "int8", "bfloat16", True, 3072, 768)


def test_the_table_decides_on_its_architecture_and_cublas_holds_for_every_class():
    tuner = tuning.Tuner("sm_90", never)
    assert tuner.choose(BF16_QKV, "large") == CUBLAS
    assert tuner.choose(BF16_QKV, "small") == CUBLAS  # cuBLAS picks its kernel per shape itself
    assert tuner.choose(INT8_WI, "large") == tuning.TABLE["sm_90"][("linear_int8", "int8", "large")]
    assert set(tuner.sources.values()) == {"table sm_90"}


def test_a_tile_measured_on_large_batches_is_measured_again_for_small_ones(tmp_path):
    timer = Timer({3: 1.0, 5: 2.0})
    tuner = tuning.Tuner("sm_90", timer, tmp_path / "tuning.json")
    chosen = tuner.choose(INT8_WI, "small")
    assert chosen == INT8_WI.candidates("small")[3] == matmul.INT8_TILE_CANDIDATES[3]
    assert CUBLAS not in INT8_WI.candidates("small")  # torch._int_mm needs more than 16 rows
    assert [i for _, i in timer.calls] == list(range(len(matmul.INT8_TILE_CANDIDATES)))
    assert json.loads((tmp_path / "tuning.json").read_text()) == {INT8_WI.key("small"): chosen}
    again = tuning.Tuner("sm_90", never, tmp_path / "tuning.json")  # the next load reads the file
    assert again.choose(INT8_WI, "small") == chosen and "tuning file" in again.sources[INT8_WI.key("small")]


def test_an_architecture_without_a_table_is_measured_and_failing_tiles_are_skipped(tmp_path):
    timer = Timer({0: 5.0, 1: 0.5, 2: 0.1}, fail=(2,))
    tuner = tuning.Tuner("sm_80", timer, tmp_path / "t.json")
    assert tuner.choose(BF16_QKV, "large") == matmul.TILE_CANDIDATES[0]  # candidate 1 is TILE_CANDIDATES[0]
    assert tuner.sources[BF16_QKV.key("large")] == "measured at load"
    with pytest.raises(RuntimeError, match="no implementation of linear/bfloat16"):
        tuning.Tuner("sm_80", Timer({}, fail=tuple(range(10)))).choose(BF16_QKV, "small")


def test_cublas_is_never_chosen_where_it_cannot_write_the_output_dtype():
    """T5's wo under float16 writes float32 (overflow): cuBLAS is not a candidate, whatever the table says."""
    wo = tuning.Site("linear", "float16", "float32", False, 768, 3072)
    assert CUBLAS not in wo.candidates("large")
    timer = Timer({})
    tuning.Tuner("sm_90", timer).choose(wo, "large")
    assert all(i < len(matmul.TILE_CANDIDATES) for _, i in timer.calls)


def test_retuning_skips_the_table_and_a_broken_file_is_measured_again(tmp_path):
    path = tmp_path / "t.json"
    path.write_text("{not json")
    tuner = tuning.Tuner("sm_90", Timer({0: 9.0, 1: 1.0}), path, use_table=False)
    assert tuner.choose(BF16_QKV, "large") == matmul.TILE_CANDIDATES[0]
    assert json.loads(path.read_text())[BF16_QKV.key("large")] == matmul.TILE_CANDIDATES[0]


def test_the_interpreter_measures_nothing():
    tuner = tuning.gpu_tuner() if DEVICE == "cpu" else tuning.Tuner("interpreter", None)
    assert tuner.measure is None and tuner.arch == "interpreter"
    assert tuner.choose(BF16_QKV, "large") == CUBLAS
    assert tuner.choose(INT8_WI, "small") == matmul.INT8_TILE_CANDIDATES[0]


@pytest.mark.parametrize(
    "site",
    [
        tuning.Site("linear", "bfloat16", "bfloat16", True, 48, 32),
        tuning.Site("linear", "float16", "float32", False, 32, 64),
        tuning.Site("linear_int8", "int8", "bfloat16", True, 48, 32),
        tuning.Site("attention", "bfloat16", n=2, k=16),
    ],
    ids=lambda site: site.op + "-" + site.dtype,
)
def test_every_candidate_can_be_timed(site):
    """What the tuner times on a GPU, run here on small shapes with a stand-in clock: each candidate's inputs
    and call are right (a wrong one would make the tuner skip a good candidate on the GPU)."""
    ran = []

    def bench(run):
        ran.append(run())
        return 1.0

    klass = "large"
    for candidate in site.candidates(klass):
        assert tuning.time_candidate(site, candidate, DEVICE, 40, bench) == 1.0
    assert len(ran) == len(site.candidates(klass)) and all(torch.isfinite(r.float()).all() for r in ran)


def test_shape_classes():
    assert [shape_class(t) for t in (1, SMALL_TOKENS, SMALL_TOKENS + 1)] == ["small", "small", "large"]


@pytest.mark.parametrize("dtype", QUANT)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("rows, d", [(1, 64), (7, 100), (33, 768)])
def test_quantize_rows_matches_its_torch_twin(dtype, relu, rows, d):
    g = torch.Generator().manual_seed(rows * d)
    x = (torch.randn(rows, d, generator=g) * 5).to(DEVICE, torch.bfloat16)
    q, scale = quantize_rows(x, dtype, relu)
    q_ref, scale_ref = quantize_rows_ref(x, dtype, relu)
    assert q.dtype == dtype and scale.dtype == torch.float32
    torch.testing.assert_close(scale.cpu(), scale_ref.cpu(), rtol=1e-6, atol=0)
    step = scale_ref.cpu()[:, None] * (1.0 if dtype == torch.int8 else 32.0)  # one unit of the last place
    assert ((q.cpu().float() - q_ref.cpu().float()).abs() * scale_ref.cpu()[:, None] <= step).all()
    dequantized = q.cpu().float() * scale.cpu()[:, None]
    exact = torch.relu(x.float().cpu()) if relu else x.float().cpu()
    cos = torch.nn.functional.cosine_similarity(dequantized, exact, dim=1)
    assert cos.min() > (0.999 if dtype == torch.int8 else 0.99), cos.min()


@pytest.mark.parametrize("dtype", QUANT)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_quantized_equals_norm_then_quantize(dtype, with_residual):
    g = torch.Generator().manual_seed(5)
    x, weight = torch.randn(9, 96, generator=g).to(DEVICE, torch.bfloat16), torch.rand(96, generator=g).to(DEVICE)
    residual = torch.randn(9, 96, generator=g).to(DEVICE) if with_residual else None
    (q, scale), s = rms_norm_quantized(x, weight, 1e-6, residual, dtype)
    (q_ref, scale_ref), s_ref = rms_norm_quantized_ref(x, weight, 1e-6, residual, dtype)
    torch.testing.assert_close(scale, scale_ref, rtol=1e-5, atol=0)
    unit = scale_ref[:, None] * (1.0 if dtype == torch.int8 else 32.0)
    assert ((q.float() - q_ref.float()).abs() * scale_ref[:, None] <= unit).all()
    assert (s is None) == (residual is None) and (s is None or torch.equal(s, s_ref))


def _projection_inputs(relu: bool):
    g = torch.Generator().manual_seed(int(relu))
    x, w = torch.randn(40, 96, generator=g), torch.randn(144, 96, generator=g) / 10
    exact = x @ w.t()
    return x.to(DEVICE), w.to(DEVICE), torch.relu(exact) if relu else exact


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("choice", [CUBLAS, matmul.TILE_CANDIDATES[1]], ids=["cublas", "tile"])
def test_float_projection_by_each_implementation(relu, choice):
    x, w, exact = _projection_inputs(relu)
    proj = Projection.prepare(w.bfloat16(), relu, torch.bfloat16, None)
    y = proj.run(choice, x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float().cpu(), exact, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize(
    "quant, choice",
    [(torch.int8, CUBLAS), (torch.int8, matmul.INT8_TILE_CANDIDATES[0]), (torch.float8_e4m3fn, None)],
    ids=["int8-cublas", "int8-tile", "float8"],
)
def test_quantized_projection_by_each_implementation(relu, quant, choice):
    x, w, exact = _projection_inputs(relu)
    proj = Projection.prepare(w, relu, torch.bfloat16, quant)
    assert proj.quantized == quant and proj.scale.shape == (144,)
    y = proj.run(choice, quantize_rows(x.bfloat16(), quant))
    assert y.dtype == torch.bfloat16 and (not relu or (y >= 0).all())
    cos = torch.nn.functional.cosine_similarity(y.float().cpu().flatten(), exact.flatten(), dim=0)
    assert cos > (0.999 if quant == torch.int8 else 0.995), cos


def test_float8_refuses_sizes_cublaslt_cannot_multiply():
    with pytest.raises(ValueError, match="float8 needs projection sizes that are multiples of 16.*130 x 100"):
        Projection.prepare(torch.randn(130, 100), False, torch.bfloat16, torch.float8_e4m3fn)


def test_a_projection_runs_the_choice_of_the_batch_shape_class(monkeypatch):
    x, w, _ = _projection_inputs(False)
    proj = Projection.prepare(w, False, torch.float32, None)
    proj.choices = {"small": matmul.TILE_CANDIDATES[2], "large": CUBLAS}
    seen = []
    monkeypatch.setattr(proj, "run", lambda choice, x: seen.append(choice))
    proj(x)
    proj(torch.zeros(SMALL_TOKENS + 1, 96, device=DEVICE))
    assert seen == [matmul.TILE_CANDIDATES[2], CUBLAS]


def test_float8_needs_fp8_tensor_cores():
    from fastinstructor.backends import TritonBackend
    from fastinstructor.hardware import Hardware

    def gpu(name, capability):
        return Hardware(name, capability, frozenset(), {}, ())

    why = TritonBackend.unavailable("float8", "cuda", gpu("NVIDIA A100-SXM4-80GB", (8, 0)))
    assert "compute capability 8.9" in why and "A100" in why and "8.0" in why
    assert TritonBackend.unavailable("float8", "cuda", gpu("NVIDIA H200", (9, 0))) is None
    assert TritonBackend.unavailable("int8", "cuda", gpu("NVIDIA A100-SXM4-80GB", (8, 0))) is None


def test_the_warm_up_meets_every_specialization():
    """Triton specializes integers on being 1 or a multiple of 16: T (the products) and B (the attention) take
    each kind in each shape class."""
    from fastinstructor.backends import TritonBackend

    def kind(n: int) -> str:
        return "one" if n == 1 else "sixteen" if n % 16 == 0 else "other"

    seen = {(shape_class(sum(b)), what, kind(n)) for b in TritonBackend.WARM_UP_BATCHES for what, n in
            (("T", sum(b)), ("B", len(b)))}  # fmt: skip
    for klass in ("small", "large"):
        for what in ("T", "B"):
            kinds = {"sixteen", "other"} | ({"one"} if klass == "small" or what == "B" else set())
            assert kinds <= {k for c, w, k in seen if c == klass and w == what}, (klass, what)


@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter's run of it; on a GPU, loading the backend runs it")
def test_the_warm_up_runs(make_model, monkeypatch):
    """warm_up through the real backend (interpreter), with small stand-ins for its batches: every batch shape
    kind goes through the forward without error."""
    from fastinstructor.backends import TritonBackend
    from fastinstructor.checkpoint import load_checkpoint

    backend = TritonBackend(load_checkpoint(make_model("tiny")), precision="int8", device="cpu")
    seen = []
    real = backend.embed_packed
    monkeypatch.setattr(backend, "embed_packed", lambda batch: seen.append(batch.rows) or real(batch))
    monkeypatch.setattr(TritonBackend, "WARM_UP_BATCHES", [[1], [16], [8, 9]])
    backend.warm_up()
    assert seen == [1, 1, 2]
