"""
Model FLOPs utilisation (MFU): the FLOPs the model's formula needs per second of training, over the devices' peak.

    FLOPs per token = 6·N + 12·L·H·D·T        (PaLM, Chowdhery et al. 2022, App. B; nanoGPT's estimate_mfu)

N: the parameters (the tied embedding / head once), L layers, H heads of dimension D, T the training context. 6·N is
the forward and backward of every weight matmul; 12·L·H·D·T the attention's QKᵀ and AV, forward and backward
(counted over all T keys, as PaLM, nanoGPT and torchtitan do). The formula is the same for every positional
encoding: the work of a bias, a gate or a rotation is not model FLOPs, so an encoding's extra cost shows as a lower
MFU at the same formula, which is what makes MFU comparable across encodings.

Peak: dense bf16 tensor throughput of one device, from PEAK_BF16 by torch.cuda.get_device_name() (first matching
entry), or the config's peak_flops when it is > 0. Where no peak is known (a CPU, a GPU not in the table) MFU is not
reported ("n/a"): a percentage of an assumed peak would mislead.
"""

import torch

# (substring of torch.cuda.get_device_name(), dense bf16 FLOP/s of one device). More specific names first: "H100 NVL"
# before "H100", "GB200" before "B200", "L40S" and "L40" before "L4". Sources: the vendors' data sheets (dense, i.e.
# without 2:4 sparsity), as torchtitan's tools/utils.py tabulates them.
PEAK_BF16 = (
    ("GH200", 989e12),
    ("H200 NVL", 835e12),
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H800", 989e12),
    ("GB200", 2500e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("MI325X", 1307e12),
    ("MI300X", 1307e12),
    ("MI250X", 191.5e12),  # per GCD, which is what one torch device is
)


def flops_per_token(n_params, n_layer, n_head, head_dim, seq_len):
    return 6 * n_params + 12 * n_layer * n_head * head_dim * seq_len


def formula(n_params, n_layer, n_head, head_dim, seq_len):
    """The formula with this model's numbers, for the start-up log."""
    total = flops_per_token(n_params, n_layer, n_head, head_dim, seq_len)
    return (f"FLOPs/token = 6N + 12·L·H·D·T = 6 x {n_params:,} + 12 x {n_layer} x {n_head} x {head_dim} x {seq_len} "
            f"= {total:,} (PaLM App. B; the same for every positional encoding)")


def device_peak(device, override=0.0):
    """(peak FLOP/s of one device or None, where it came from) for a torch.device."""
    if override > 0:
        return override, "peak_flops from the config"
    if device.type != "cuda":
        return None, f"no peak known for {device.type}"
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16:
        if key in name:
            return peak, f"{name}, dense bf16"
    return None, f"{name} is not in mfu.PEAK_BF16; set peak_flops to report MFU"


def utilisation(tokens_per_s_per_device, flops_token, peak):
    """MFU as a fraction, or None where the peak is unknown."""
    return None if peak is None else tokens_per_s_per_device * flops_token / peak


def percent(mfu):
    return "n/a" if mfu is None else f"{100 * mfu:.1f}%"
