"""
The fused attention kernels that need optional packages, for CausalSelfAttention.attend (model.py), which picks a
path with model.attention_path:

    forgetting_attention(q, k, v, log_f, scale)            FoX through fla-core's parallel_forgetting_attn
    grape_ap_attention(q, k, v, p_q, p_k, slopes, scale)   GRAPE-AP through kernels/grape_ap.py (a Triton kernel)
    unavailable(kernel)                                    None if "fla" / "grape_ap" can be imported here, else
                                                           the reason it cannot (one line, naming the package)

Tensors are the model's (B, H, T, ...) layout in and out. fla-core and Triton are in requirements.txt (on a CPU
their kernels run only under TRITON_INTERPRET=1, as the tests run them); kernels/grape_ap.py is this repository's.
Every optional import sits in a try/except ImportError and happens on first use, so importing this module costs
nothing and needs only torch (and the transformers remote-code loader, which refuses unconditional imports of absent
packages, accepts it). A machine without them (a GPU node with only its preinstalled torch) takes the other paths.

Both kernels run outside torch.compile's graphs (torch.compiler.disable: one graph break per call inside a compiled
block): their Python wrappers (autotuners, device queries, fla's contiguity and autocast decorators) are not
code that dynamo traces.
"""

import torch

_LOADED = {}  # kernel name -> (the module or function, None) or (None, why it is unavailable)


def _load(kernel):
    if kernel in _LOADED:
        return _LOADED[kernel]
    if kernel == "fla":
        try:
            from fla.ops.forgetting_attn import parallel_forgetting_attn
            found = parallel_forgetting_attn, None
        except ImportError as e:
            found = None, f"fla-core is not installed (pip install -r requirements.txt): {e}"
        except Exception as e:  # an installed fla that fails to import (e.g. a Triton it does not support)
            found = None, f"fla-core failed to import: {type(e).__name__}: {e}"
    elif kernel == "grape_ap":
        try:
            from kernels import grape_ap
            found = (grape_ap, None) if grape_ap.available() else (None, "kernels.grape_ap.available() is False")
        except ImportError as e:
            found = None, f"kernels/grape_ap.py is not importable: {e}"
    else:
        raise ValueError(f"unknown fused kernel {kernel!r}; expected 'fla' or 'grape_ap'")
    _LOADED[kernel] = found
    return found


@torch.compiler.assume_constant_result
def unavailable(kernel):
    """None if `kernel` ("fla" or "grape_ap") can run in this process, else why not. Constant for a process (the
    import is tried once), which is what lets torch.compile fold the choice of path into a graph."""
    return _load(kernel)[1]


@torch.compiler.disable
def forgetting_attention(q, k, v, log_f, scale):
    """FoX (Lin et al., 2025): out_i = sum_{j <= i} softmax_j(<q_i, k_j> scale + G_i - G_j) v_j, G = cumsum(log f).
    q, k (B, H, T, D); v (B, H, T, Dv); log_f (B, H, T), the per-step log forget gate (not its cumsum: fla sums
    it itself, in fp32); returns (B, H, T, Dv) in q's dtype. fla's layout is (B, T, H, D): the transposes are views
    of the model's own (B, T, H, D) projections, and its backward returns the gradient of log_f."""
    kernel, why = _load("fla")
    if kernel is None:
        raise RuntimeError(why)
    out = kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), log_f.transpose(1, 2).float(),
                 scale=scale)
    return out.transpose(1, 2)


@torch.compiler.disable
def grape_ap_attention(q, k, v, p_q, p_k, slopes, scale):
    """GRAPE-AP (model.GrapeAP): q, k, v (B, H, T, D); p_q (B, H, T, d_p) the query probes, p_k (B, H, T, d_p) the
    normalised rotated key probes (GrapeAP.features), slopes (H,); returns (B, H, T, Dv)."""
    module, why = _load("grape_ap")
    if module is None:
        raise RuntimeError(why)
    return module.grape_ap_attention(q, k, v, p_q, p_k, slopes, scale)
