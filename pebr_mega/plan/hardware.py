"""The cards a plan can be made for, and the rates its time estimates use, each with its source.

A rate is either measured on that card by this project (docs/PERFORMANCE.md, or the shared
reference/GPU_ANCHORS.md; the source names the table row, its date and the commit that recorded it), or,
where nothing was measured, derived from the vendor datasheet and marked so. The plan prints the source of
every rate it uses; nothing here parses the markdown.
"""
from __future__ import annotations

from dataclasses import dataclass, field

GIB = 2**30

# Interconnect figures nobody has measured for this project: NCCL all-reduce bus bandwidths typical of
# nccl-tests on these systems. Used for the TP/DP communication terms only, always printed as assumed.
_NVLINK4_BUSBW = 450e9  # H100/H200 SXM, 8 GPUs on NVLink 4 / NVSwitch
_NVLINK3_BUSBW = 230e9  # A100 SXM, NVLink 3
_IB_BUSBW = 45e9  # between nodes: 8 x 400 Gb/s InfiniBand per node, i.e. ~50 GB/s per GPU


@dataclass(frozen=True)
class Rate:
    """A figure the time model uses, and where it comes from."""

    value: float
    unit: str
    source: str
    measured: bool

    def describe(self) -> str:
        """'value unit (source)' for the report."""
        shown = f"{self.value / 1e12:.0f} TFLOP/s" if self.unit == "FLOP/s" else f"{self.value / 1e9:.0f} GB/s"
        return f"{shown}: {self.source}"


@dataclass(frozen=True)
class GpuSpec:
    """One card: memory as CUDA reports it and the rates the plan uses."""

    name: str
    label: str
    memory_bytes: int  # nvidia-smi memory.total
    rates: dict = field(default_factory=dict)  # name -> Rate: matmul, train, copy, nvlink, internode

    def rate(self, name: str) -> Rate:
        """The named rate (KeyError names the card when it has none)."""
        if name not in self.rates:
            raise KeyError(f"no '{name}' rate for {self.name}")
        return self.rates[name]


_PERF = "docs/PERFORMANCE.md"
_H100_RUN = "one H100 80GB HBM3, 2026-11-26, commit a0fd210"
_ANCHORS = "reference/GPU_ANCHORS.md (one H200, 2026-11-26)"


def _datasheet(value: float, unit: str, what: str) -> Rate:
    return Rate(value, unit, f"{what} (vendor datasheet, not measured by this project)", measured=False)


def _links(nvlink_busbw: float, nvlink_gen: int, internode: str = "") -> dict[str, Rate]:
    """The assumed NCCL rates of a card: all-reduce bus bandwidth on its NVLink and between nodes."""
    return {"nvlink": Rate(nvlink_busbw, "B/s", f"NCCL all-reduce bus bandwidth on NVLink {nvlink_gen} (assumed, "
                                                "typical nccl-tests figure; not measured by this project)", False),
            "internode": Rate(_IB_BUSBW, "B/s", f"NCCL bus bandwidth between nodes{internode} (assumed; not measured "
                                                "by this project)", False)}


_IB_PER_NODE = ", 8 x 400 Gb/s InfiniBand per node"


def _a100(name: str, label: str, memory_mib: int, hbm_bytes_per_s: float, hbm: str) -> GpuSpec:
    """An A100: datasheet rates; no A100 was measured, so its training rate is the peak times the H100's
    measured train/matmul ratio (398.8 / 728 = 0.55)."""
    return GpuSpec(name, label, memory_mib * 2**20, {
        "matmul": _datasheet(312e12, "FLOP/s", "A100 dense bf16 peak 312 TFLOP/s"),
        "train": _datasheet(312e12 * 398.8 / 728, "FLOP/s", "A100 peak x the H100's measured train/matmul ratio 0.55"),
        "copy": _datasheet(hbm_bytes_per_s * 0.9, "B/s", f"{hbm} x 0.9"),
        **_links(_NVLINK3_BUSBW, 3),
    })


GPUS: dict[str, GpuSpec] = {
    "h100-80gb": GpuSpec("h100-80gb", "NVIDIA H100 80GB HBM3 (SXM)", 81559 * 2**20, {
        "matmul": Rate(728e12, "FLOP/s", f"{_PERF} 'Kernels', bf16 8192^3 matmul, {_H100_RUN}", True),
        "train": Rate(398.8e12, "FLOP/s", f"{_PERF} 'Train step' row: 7B-shaped 4+4v layers, seq 4096, torch spec, "
                                          f"model TFLOP/s, {_H100_RUN}", True),
        "copy": Rate(3.01e12, "B/s", f"{_PERF} 'Kernels', device copy bandwidth (read + write), {_H100_RUN}", True),
        **_links(_NVLINK4_BUSBW, 4, _IB_PER_NODE),
    }),
    "h200-141gb": GpuSpec("h200-141gb", "NVIDIA H200 141GB HBM3e (SXM)", 143771 * 2**20, {
        "matmul": Rate(701e12, "FLOP/s", f"{_ANCHORS}: bf16 matmul 8192^3 (770-800 seen on other runs)", True),
        "train": Rate(519e12, "FLOP/s", f"{_ANCHORS}: actor step, Megatron-Core local spec + SDPA, 7B-shaped 4 layers, "
                                        "seq 4096, model TFLOP/s (text only)", True),
        "copy": Rate(4.27e12, "B/s", f"{_ANCHORS}: device-to-device copy (read + write)", True),
        **_links(_NVLINK4_BUSBW, 4, _IB_PER_NODE),
    }),
    "a100-80gb": _a100("a100-80gb", "NVIDIA A100-SXM4-80GB", 81920, 2.039e12, "A100 80GB HBM2e 2.04 TB/s"),
    "a100-40gb": _a100("a100-40gb", "NVIDIA A100-SXM4-40GB", 40960, 1.555e12, "A100 40GB HBM2 1.56 TB/s"),
}


def gpu_spec(name: str) -> GpuSpec:
    """The card named `name` (e.g. `h100-80gb`); a ValueError lists the known ones."""
    key = name.lower()
    if key not in GPUS:
        raise ValueError(f"--gpu {name!r} is not one of {sorted(GPUS)}")
    return GPUS[key]
