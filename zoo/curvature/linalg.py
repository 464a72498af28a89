"""Dense kernels of the K-FAC pass: triangle accumulation and the input rows of Linear / Conv2d layers.

The input factor of a conv costs about 9× the conv's forward FLOPs, so it is accumulated into the lower
triangle only, in row blocks, with in-place ``addmm_`` (BLAS gemm on strided views, no temporaries).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_BLOCK = 128


def syrk_lower_(acc: Tensor, rows: Tensor, block: int = _BLOCK) -> None:
    """Add the lower triangle (diagonal included) of ``rowsᵀ rows`` to ``acc`` in place.

    ``rows`` is (M, D). The strictly upper part of ``acc`` receives partial, meaningless sums from the
    diagonal blocks; :func:`symmetrize_lower` discards it. Cost ≈ D²·M·(1 + block/D)/2 multiply-adds.
    """
    d = rows.shape[1]
    if d <= block:
        acc.addmm_(rows.T, rows)
        return
    for i0 in range(0, d, block):
        i1 = min(i0 + block, d)
        acc[i0:i1, :i1].addmm_(rows[:, i0:i1].T, rows[:, :i1])


def symmetrize_lower(acc: Tensor, block: int = _BLOCK) -> Tensor:
    """Make ``acc`` symmetric in place from its lower triangle (blocked transposed copies); return it."""
    d = acc.shape[0]
    for i0 in range(0, d, block):
        i1 = min(i0 + block, d)
        diag = acc[i0:i1, i0:i1].tril()
        acc[i0:i1, i0:i1] = diag + diag.tril(-1).T
        acc[i0:i1, i1:] = acc[i1:, i0:i1].T
    return acc


def all_finite(t: Tensor) -> bool:
    """Whether ``t`` holds no NaN/inf: its min and max (NaN propagates) in one pass, without the float64
    copy a float64 sum makes of a float32 tensor and without any risk of the sum overflowing."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _padded(x: Tensor, conv: nn.Conv2d) -> tuple[Tensor, tuple[int, int]]:
    """The conv input with its padding applied explicitly (any padding mode), and the padding left to do."""
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        return F.pad(x, conv._reversed_padding_repeated_twice, mode=mode), (0, 0)
    return x, conv.padding  # type: ignore[return-value]


def conv_patch_rows(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """Unfolded input patches of a (groups == 1) conv as rows: (B·positions, in_channels·kh·kw).

    Column order is (channel, kh, kw), the order of ``conv.weight.reshape(out, -1)``. Built as one strided
    copy of the channels-last padded input (2-3× faster than ``F.unfold`` + transpose on CPU).
    """
    x, padding = _padded(x, conv)
    c = x.shape[1]
    x = x.permute(0, 2, 3, 1)
    if conv.kernel_size == (1, 1) and conv.stride == (1, 1) and padding == (0, 0):
        return x.reshape(-1, c)
    (ph, pw), (kh, kw), (sh, sw), (dh, dw) = padding, conv.kernel_size, conv.stride, conv.dilation
    if ph or pw:
        x = F.pad(x, (0, 0, pw, pw, ph, ph))
    windows = x.unfold(1, dh * (kh - 1) + 1, sh).unfold(2, dw * (kw - 1) + 1, sw)  # B, Ho, Wo, C, span_h, span_w
    windows = windows[..., ::dh, ::dw]
    return windows.reshape(-1, c * kh * kw)


def conv_output_size(x: Tensor, conv: nn.Conv2d) -> tuple[int, int]:
    """Spatial size of the conv's output for input ``x`` (after explicit padding)."""
    x, padding = _padded(x, conv)
    out = []
    for i in range(2):
        span = conv.dilation[i] * (conv.kernel_size[i] - 1) + 1
        out.append((x.shape[2 + i] + 2 * padding[i] - span) // conv.stride[i] + 1)
    return out[0], out[1]


def conv_mean_patches(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """Patches averaged over output positions, (B, in_channels·kh·kw), without materialising the unfold.

    Each kernel offset (i, j) sees a strided window of the padded input; its mean is one slice-sum.
    """
    ho, wo = conv_output_size(x, conv)
    x, padding = _padded(x, conv)
    if padding != (0, 0):
        x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    cols = []
    for i in range(kh):
        for j in range(kw):
            win = x[:, :, i * dh : i * dh + sh * (ho - 1) + 1 : sh, j * dw : j * dw + sw * (wo - 1) + 1 : sw]
            cols.append(win.sum(dim=(2, 3)))
    return torch.stack(cols, dim=2).reshape(x.shape[0], -1) / (ho * wo)


def conv_patches(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """Unfolded patches kept per example: (B, in_channels·kh·kw, positions), for per-example gradients."""
    x, padding = _padded(x, conv)
    return F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride)
