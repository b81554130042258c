"""relbert_ds.training.monitor: the peak MFU is measured against, and timings that wait for the device."""
import pytest
import torch

from relbert_ds.training import monitor


@pytest.fixture
def h100(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    flag = torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32 = flag


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_16_bit_runs_use_the_tensor_core_peak(h100, precision):
    peak, why = monitor.device_peak_flops(None, precision)
    assert peak == 989e12 and precision in why


def test_fp32_peak_follows_torchs_tf32_switch(h100):
    # torch's real switch: off by default, fp32 matmuls then run on CUDA cores (67 TFLOP/s on an H100,
    # 1/15 of bf16); with TF32 on they run on tensor cores at half the bf16 rate.
    torch.backends.cuda.matmul.allow_tf32 = False
    peak, why = monitor.device_peak_flops(None, "fp32")
    assert peak == 67e12 and "TF32 off" in why
    torch.backends.cuda.matmul.allow_tf32 = True
    peak, why = monitor.device_peak_flops(None, "fp32")
    assert peak == 989e12 / 2 and "TF32" in why
    assert monitor.device_peak_flops(2.5, "fp32") == (2.5e12, "given by --peak_tflops")


def test_every_gpu_with_a_16_bit_peak_has_an_fp32_one():
    assert monitor.GPU_PEAK_FLOPS.keys() == monitor.GPU_FP32_PEAK_FLOPS.keys()
    assert all(monitor.GPU_FP32_PEAK_FLOPS[k] < monitor.GPU_PEAK_FLOPS[k] for k in monitor.GPU_PEAK_FLOPS)


def test_synchronize_waits_for_cuda_work_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    monitor.synchronize(torch.device("cpu"))
    assert calls == []
    monitor.synchronize(torch.device("cuda", 1))
    assert calls == [torch.device("cuda", 1)]
