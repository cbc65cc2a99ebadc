"""Model FLOPs per token and MFU, counted from the geometry alone.

Convention (MaxText's, since mid-2025). Per token, for L layers, d_model D, N query and
K kv heads of dim H, SwiGLU width F, vocab V and sequence length T, the forward pass costs

    L * [2*D*(N+2K)*H  +  2*N*H*D  +  2*3*D*F  +  4*T*N*H * c]  +  2*D*V

(QKV projection, output projection, gate/up/down, attention scores and values, LM head),
with c = 1/2 for causal attention and 1 for full attention. The embedding gather, norms,
RoPE and softmax are not counted. A training token costs 3x the forward (the backward is two
matmuls per forward matmul). Only model FLOPs count: remat's recomputation is excluded, so
MFU is comparable across remat policies. PaLM and nanoGPT count the full 4*T*N*H even for
causal attention, so their MFU reads higher at long T.
"""

from __future__ import annotations

import re

from phi4_jax.model.config import ModelConfig

# Dense (not sparse) bf16 peak per device, as the field quotes it. The NVL and GH200 entries
# are half of NVIDIA's with-sparsity datasheet figures.
PEAK_BF16_FLOPS: dict[str, float] = {
    "H100 SXM": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200": 989e12,
    "H200 NVL": 835e12,
    "GH200": 989e12,
    "A100": 312e12,
    "B200": 2250e12,
    "TPU v4": 275e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6e": 918e12,
}

# Searched in order over the normalized device kind (lower case, words separated by single
# spaces), so variants come before their base chip: "NVIDIA H100 PCIe" must not read as SXM.
# TPU kinds are matched whole: "TPU v4 lite" is v4i and "TPU v5" is v5p.
_DEVICE_KIND_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"\bh100\b.*\bpcie\b", "H100 PCIe"),
    (r"\bh100\b.*\bnvl\b", "H100 NVL"),
    (r"\bh200\b.*\bnvl\b", "H200 NVL"),
    (r"\bgh200\b", "GH200"),
    (r"\bh100\b", "H100 SXM"),
    (r"\bh200\b", "H200"),
    (r"\ba100\b", "A100"),
    (r"\bb200\b", "B200"),
    (r"^tpu v4$", "TPU v4"),
    (r"^tpu (v5 lite|v5e)$", "TPU v5e"),
    (r"^tpu v5p?$", "TPU v5p"),
    (r"^tpu (v6 lite|v6e)$", "TPU v6e"),
)


def _check_seq_len(seq_len: int) -> None:
    if not isinstance(seq_len, int) or seq_len <= 0:
        raise ValueError(f"seq_len={seq_len!r} must be a positive integer (tokens per row).")


def forward_flops_per_token(cfg: ModelConfig, seq_len: int, *, causal: bool = True) -> float:
    """Forward matmul FLOPs per token, attention included (see the module docstring)."""
    _check_seq_len(seq_len)
    d, n, k, h, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.ffn_dim
    projections = 2 * d * (n + 2 * k) * h + 2 * n * h * d + 2 * 3 * d * f
    attention = 4 * seq_len * n * h * (0.5 if causal else 1.0)
    return float(cfg.num_layers * (projections + attention) + 2 * d * cfg.vocab_size)


def train_flops_per_token(cfg: ModelConfig, seq_len: int, *, causal: bool = True) -> float:
    """Forward plus backward: three forwards' worth of matmuls."""
    return 3.0 * forward_flops_per_token(cfg, seq_len, causal=causal)


def accelerator_for(device_kind: str) -> str | None:
    """The `PEAK_BF16_FLOPS` key for a jax `Device.device_kind`, or None when unknown."""
    normalized = " ".join(re.sub(r"[^a-z0-9]+", " ", device_kind.lower()).split())
    for pattern, name in _DEVICE_KIND_PATTERNS:
        if re.search(pattern, normalized):
            return name
    return None


def peak_flops(device_kind: str, *, override: float | None = None) -> float | None:
    """Peak bf16 FLOP/s of one device; None for unknown kinds (and CPUs) so MFU reads n/a.

    `override` (FLOP/s) wins over the table: for CPUs, new chips or a measured peak.
    """
    if override is not None:
        if override <= 0:
            raise ValueError(f"peak FLOP/s override {override!r} must be positive.")
        return float(override)
    name = accelerator_for(device_kind)
    return None if name is None else PEAK_BF16_FLOPS[name]


def mfu(tokens_per_second_per_device: float, cfg: ModelConfig, seq_len: int,
        peak: float | None) -> float | None:
    """Model FLOPs utilization in [0, 1]: achieved training FLOP/s over the device peak."""
    if tokens_per_second_per_device < 0:
        raise ValueError(f"tokens_per_second_per_device={tokens_per_second_per_device!r} "
                         f"must be non-negative.")
    if peak is None:
        return None
    if peak <= 0:
        raise ValueError(f"peak={peak!r} FLOP/s must be positive (or None when unknown).")
    return tokens_per_second_per_device * train_flops_per_token(cfg, seq_len) / peak
