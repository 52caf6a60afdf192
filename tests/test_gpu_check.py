"""benches/gpu_check.py's bookkeeping, on made-up parts and by hand: what reaches the JSON
and when, and the measurements' definitions. Every real part runs on this CPU in
tests/test_device_run.py (device-run.sh --cpu-rehearsal)."""

import json

import pytest
import torch

from benches import gpu_check
from benches.gpu_check import main


def test_gpu_check_unknown_part_is_one_line(capsys):
    with pytest.raises(SystemExit):
        main(["--parts", "steps,warp"])
    assert "unknown part 'warp'" in capsys.readouterr().err


@pytest.fixture
def made_up_part(monkeypatch, tmp_path):
    """A part of three configurations: the second reads the JSON as it stands while it
    runs, the third fails."""
    out = tmp_path / "gpu-check.json"
    seen = {}

    def second():
        seen.update(json.loads(out.read_text())["parts"]["made_up"])
        return {"b": 2}

    def third():
        raise RuntimeError("CUDA error: an illegal memory access")

    configs = [("first", lambda: {"a": 1}), ("second", second), ("third", third)]
    monkeypatch.setitem(gpu_check.PARTS, "made_up", lambda ctx: configs)
    return out, seen


def test_the_json_is_written_after_every_configuration(made_up_part):
    out, seen = made_up_part
    assert main(["--parts", "made_up", "--out", str(out)]) == 0
    # while the second ran, the first was written and the second marked as in flight
    assert seen["first"] == {"a": 1} and seen["second"] == {"status": "running"}
    part = json.loads(out.read_text())["parts"]["made_up"]
    assert part["second"] == {"b": 2}
    assert part["third"]["status"] == "error" and "illegal memory" in part["third"]["error"]
    assert part["status"] == "error"


def test_no_configuration_starts_after_the_budget(made_up_part):
    out, _ = made_up_part
    assert main(["--parts", "made_up", "--out", str(out), "--budget", "0"]) == 0
    part = json.loads(out.read_text())["parts"]["made_up"]
    assert part["status"] == "skipped"
    assert all(part[k]["status"] == "skipped" for k in ("first", "second", "third"))


def test_merge_keeps_the_parts_of_earlier_processes(made_up_part, monkeypatch):
    out, _ = made_up_part
    monkeypatch.setitem(gpu_check.PARTS, "other", lambda ctx: [("x", lambda: {"x": 1})])
    main(["--parts", "other", "--out", str(out)])
    main(["--parts", "made_up", "--out", str(out), "--merge"])
    assert list(json.loads(out.read_text())["parts"]) == ["other", "made_up"]
    main(["--parts", "made_up", "--out", str(out)])
    assert list(json.loads(out.read_text())["parts"]) == ["made_up"]


def test_each_trainer_starts_from_a_fresh_compiler(monkeypatch):
    """Otherwise the batch-128 rows recompile the batch-4 graph with a symbolic batch."""
    calls = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: calls.append(1))
    gpu_check.fresh_trainer_state()
    assert calls == [1]


def test_step_rows_time_triton_and_torch_eager_before_any_compile():
    rows = gpu_check.step_rows(smoke=False)
    modes = [mode for _, _, mode, _ in rows]
    assert modes == sorted(modes, key=lambda m: m == "compiled")
    for mode in ("eager", "compiled"):
        for batch in (4, 128):
            assert (batch, "amp", mode, "triton") in rows
            assert (batch, "amp", mode, "torch") in rows
    assert len(set(rows)) == len(rows)


def test_throughput_leaves_out_the_first_window_which_compiles():
    rows = [{"step": 50, "perf/images_per_sec": 10.0}, {"step": 50, "train/loss": 1.0}]
    rows += [{"step": s, "perf/images_per_sec": v} for s, v in ((100, 300.0), (150, 500.0))]
    assert gpu_check.throughput(rows) == {
        "images_per_sec": 400.0,
        "images_per_sec_first_window": 10.0,
    }


def test_a_fused_jobs_peak_is_its_own(monkeypatch):
    """What the job allocated on top of what was held when it started, not the
    process's peak."""
    gib = 2**30
    state = {"allocated": 5 * gib, "peak": 9 * gib}  # 9: an earlier job's peak

    def job():
        state["peak"] = max(state["peak"], 8 * gib)
        return {"seconds": 1.0}

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: state["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: state["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: state.update(peak=0))
    assert gpu_check.job_peak_gib(job) == ({"seconds": 1.0}, 3.0)


def test_the_eager_group_norm_baseline_gives_group_norm_one_dtype(monkeypatch):
    """CUDA's group_norm refuses bf16 x with fp32 weights (the CPU's accepts it); the
    kernel bench's inputs are channels_last, as training feeds them."""
    import torch.nn.functional as F

    from benches import test_bench_kernels as bench

    real = F.group_norm

    def strict(x, groups, weight, bias, eps=1e-5):
        assert x.dtype == weight.dtype == bias.dtype, (x.dtype, weight.dtype)
        return real(x, groups, weight, bias, eps)

    monkeypatch.setattr(F, "group_norm", strict)
    monkeypatch.setattr(bench, "DTYPE", torch.bfloat16)
    x, w, b = bench.gn_inputs(2, 16, 4)
    assert x.dtype == torch.bfloat16 and w.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    assert bench.eager_group_norm_silu(x, w, b, 8).dtype == torch.float32
